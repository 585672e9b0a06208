"""Polyak / exponential moving average of weights, evaluated beside the raw weights."""

from __future__ import annotations

import copy

import torch


def ema_decay_at(decay: float, step: int | None) -> float:
    """The decay used at update number `step` (0-based): min(decay, (1 + step) / (10 + step)),
    TensorFlow's ExponentialMovingAverage(num_updates) warm-up, so a short run's average is not
    dominated by its initial weights; `step=None` gives the constant decay."""
    return decay if step is None else min(decay, (1 + step) / (10 + step))


class EMA:
    """ema <- d * ema + (1 - d) * weights after every optimizer step, d = ema_decay_at(decay, step)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        ema = [p for p in self.module.parameters()]
        raw = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - ema_decay_at(self.decay, step))
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
