"""Polyak / exponential moving average of weights, evaluated beside the raw weights."""

from __future__ import annotations

import copy

import torch

from vitscale.utils.tensors import local


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

    @classmethod
    def over(cls, module: torch.nn.Module, decay: float) -> EMA:
        """An EMA kept in `module`, a copy of the model built (and sharded) like it, holding the
        same weights: a sharded model is not deep-copied, its twin is built alongside."""
        ema = cls.__new__(cls)
        ema.decay, ema.module = decay, module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return ema

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        # Sharded parameters (DTensors) are averaged shard by shard: both models shard alike.
        ema = [local(p) for p in self.module.parameters()]
        raw = [local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - ema_decay_at(self.decay, step))
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

