"""Memory-lean optimizers of Scaling ViT: Adam with a bfloat16 first moment, and big_vision's
Adafactor (factored second moment, bf16 momentum, decoupled weight decay).

Both keep the state the way optax does: the update of a step uses the first moment computed in
fp32, and only the copy kept for the next step is rounded to the momentum dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"momentum_dtype must be one of {list(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _dtype_name(value: str | torch.dtype) -> str:
    # Param groups are saved as JSON by the checkpoint code, so keep the dtype as a string.
    return str(_dtype(value)).removeprefix("torch.")


class _MomentumDtypeMixin:
    """Shared by both optimizers: the closure and dense-gradient preamble of `step`, and
    `Optimizer.load_state_dict`'s cast of every float state tensor to its parameter's dtype
    undone for the first moment (bf16 -> fp32 -> bf16 is exact)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _closure_loss(self, closure: Any) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _with_grads(self, group: dict[str, Any]):
        """The group's parameters that have a (dense) gradient."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            yield p

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        for group in self.param_groups:
            dtype = _dtype(group["momentum_dtype"])
            for p in group["params"]:
                pstate = self.state.get(p, {})
                if "exp_avg" in pstate:
                    pstate["exp_avg"] = pstate["exp_avg"].to(dtype)


class AdamBF16(_MomentumDtypeMixin, Optimizer):
    """Adam / AdamW with the first moment stored in `momentum_dtype` (bfloat16 by default) and the
    second moment in fp32, bias-corrected like Adam (Scaling ViT, "Adam with bf16 momentum").

    Weight decay is decoupled and multiplied by the lr, exactly as `torch.optim.AdamW`:
    theta <- theta * (1 - lr * weight_decay) - lr * m_hat / (sqrt(v_hat) + eps).
    With momentum_dtype=float32 this is AdamW. State per parameter: 2 + 4 bytes (1.5x fp32 params).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0,
                 momentum_dtype: str | torch.dtype = "bfloat16") -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum_dtype=_dtype_name(momentum_dtype))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            dtype = _dtype(group["momentum_dtype"])
            for p in self._with_grads(group):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float()
                # fp32 moment for this step's update; only the stored copy is rounded (optax mu_dtype).
                stored = state["exp_avg"]
                m = stored.float().mul_(beta1).add_(grad, alpha=1 - beta1)
                if m is not stored:
                    stored.copy_(m)
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss


def factored_dims(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(largest axis, second-largest axis) when both are >= `min_dim_size_to_factor`, else None.

    Ties go as numpy's stable argsort in optax: among equal sizes the later axis counts as larger.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    largest, second = order[-1], order[-2]
    if shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


class AdafactorBV(_MomentumDtypeMixin, Optimizer):
    """big_vision's Adafactor as used for ViT-g/G (Scaling ViT), per tensor with gradient g and
    0-based step count t:

    1. beta2_t = min(beta2_cap, 1 - (t + 1) ** -decay_rate), so the first step uses g^2 alone.
    2. G = g^2 + eps (eps = 1e-30, added before averaging; no eps under the square root).
    3. Factored, when the two largest dims (a largest, b second) are both >= min_dim_size_to_factor:
       R = EMA_beta2(mean_a G), C = EMA_beta2(mean_b G), u = g / sqrt(R * C / mean_b R).
       Otherwise (vectors, scalars, small matrices, patch conv kernels): V = EMA_beta2(G),
       u = g / sqrt(V). Other axes of >2-D tensors are batch axes of the factorisation.
    4. Optional update clipping: u <- u / max(1, RMS(u) / clipping_threshold).
    5. Momentum: m = momentum * m + (1 - momentum) * u with no bias correction; m is kept in
       `momentum_dtype` (bfloat16 by default); `momentum=None` drops it (update = u).
    6. theta <- theta * (1 - lr * weight_decay) - lr * m, with lr the group's current (scheduled)
       learning rate. No relative step size (no scaling by the parameter RMS).

    Weight decay convention: torch-AdamW-like, wd is multiplied by the group's lr. big_vision
    instead applies an absolute wd_bv that is multiplied by the schedule s(t) but not by lr:
    theta -= s(t) * (lr * lr_mult * m + wd_bv * theta). So weight_decay = wd_bv / (base_lr * lr_mult);
    big_vision's configs write wd_bv = 0.03 * lr (body) and 3.0 * lr (head) for ViT-g, which is
    weight_decay = 0.03 and 3.0 here (for lr_mult 1). timm's `AdafactorBigVision` with its default
    unscaled_wd=False uses the same convention.

    State per factored tensor: the momentum (2 bytes/param in bf16) plus fp32 row and column
    statistics; unfactored tensors keep a full fp32 second moment (4 bytes/param).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float | None = 0.9, momentum_dtype: str | torch.dtype = "bfloat16",
                 min_dim_size_to_factor: int = 32, decay_rate: float = 0.8,
                 beta2_cap: float = 0.999, eps: float = 1e-30,
                 clipping_threshold: float | None = None) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr}, {weight_decay}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
        if clipping_threshold is not None and clipping_threshold <= 0:
            raise ValueError(f"clipping_threshold must be positive or None, got {clipping_threshold}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        momentum_dtype=_dtype_name(momentum_dtype),
                        min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
                        beta2_cap=beta2_cap, eps=eps, clipping_threshold=clipping_threshold)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        dims = factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
        if dims is None:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            largest, second = dims
            state["exp_avg_sq_r"] = p.new_zeros(_keep(p.shape, largest), dtype=torch.float32)
            state["exp_avg_sq_c"] = p.new_zeros(_keep(p.shape, second), dtype=torch.float32)
        if group["momentum"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=_dtype(group["momentum_dtype"]))
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["momentum"]
            for p in self._with_grads(group):
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                beta2 = min(group["beta2_cap"], 1.0 - (state["step"] + 1) ** -group["decay_rate"])
                state["step"] += 1
                grad = p.grad.float()
                grad_sq = grad.square().add_(group["eps"])
                if "exp_avg_sq" in state:
                    v = state["exp_avg_sq"].mul_(beta2).add_(grad_sq, alpha=1 - beta2)
                    update = grad * v.rsqrt()
                else:
                    largest, second = factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
                    r = state["exp_avg_sq_r"].mul_(beta2).add_(
                        grad_sq.mean(dim=largest, keepdim=True), alpha=1 - beta2)
                    c = state["exp_avg_sq_c"].mul_(beta2).add_(
                        grad_sq.mean(dim=second, keepdim=True), alpha=1 - beta2)
                    row_factor = (r / r.mean(dim=second, keepdim=True)).rsqrt_()
                    update = grad * row_factor * c.rsqrt()
                if group["clipping_threshold"] is not None:
                    rms = update.square().mean().sqrt()
                    update.div_((rms / group["clipping_threshold"]).clamp_(min=1.0))
                if beta1 is not None:
                    # fp32 value for this step, rounded copy for the next (optax ema with
                    # accumulator_dtype); .float() is the state itself when it is already fp32.
                    stored = state["exp_avg"]
                    update = stored.float().mul_(beta1).add_(update, alpha=1 - beta1)
                    if update is not stored:
                        stored.copy_(update)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss


def _keep(shape: torch.Size, reduced: int) -> list[int]:
    out = list(shape)
    out[reduced] = 1
    return out


def state_bytes(optimizer: Optimizer) -> int:
    """Total bytes of the tensors in an optimizer's per-parameter state (moments, step tensors)."""
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    for pstate in optimizer.state.values():
        add(pstate)
    return total
