"""Polyak / exponential moving average of weights, evaluated beside the raw weights."""

from __future__ import annotations

import copy

import torch


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = [p for p in self.module.parameters()]
        raw = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
