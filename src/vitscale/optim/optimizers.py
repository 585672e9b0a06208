"""Memory-lean optimizers of Scaling ViT: Adam with a bfloat16 first moment, and big_vision's
Adafactor (factored second moment, bf16 momentum, decoupled weight decay).

The first moment follows optax (`scale_by_adam(mu_dtype=...)`, `ema(accumulator_dtype=...)`) dtype
by dtype: m = (1 - b1) * g + b1 * m_prev, where b1 * m_prev is a product in the moment's dtype,
b1 itself rounded to it (0.9 is 0.8984375 in bf16), and the sum is fp32. The step's update uses
that fp32 sum; the state keeps its rounding. Those are the dtypes the optax program states, and
what optax computes op by op. Under jit XLA may keep the bf16 product in fp32 ("excess
precision", on by default); on CPU that moves a 25-step bf16 run by about half as much as
rounding b1 does (tests/test_optim.py compares with it off).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from vitscale.errors import CheckpointError

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


def _rounded(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=dtype).item()


def _moment_update(stored: torch.Tensor, value: torch.Tensor, decay: float,
                   decay_rounded: float) -> torch.Tensor:
    """optax's first-moment EMA with the accumulator `stored` in a low-precision dtype: returns
    the fp32 (1 - decay) * value + decay * stored and keeps its rounding in `stored`.

    decay * stored is a product in stored's dtype with decay rounded to that dtype first
    (`decay_rounded`), as JAX multiplies a Python float and a bf16 array; the products are
    rounded separately (no fused multiply-add), as optax computes them op by op.
    """
    new = value.mul(1 - decay).add_(stored.mul(decay_rounded))
    stored.copy_(new)
    return new


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

    def _has_grad(self, p: torch.Tensor) -> bool:
        """Whether `p` has a gradient to apply; sparse gradients are refused."""
        if p.grad is None:
            return False
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return True

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
    second moment in fp32, bias-corrected like Adam (Scaling ViT, "Adam with bf16 momentum"); the
    first moment as optax's `scale_by_adam(mu_dtype=...)` (module docstring).

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
            beta1_rounded = _rounded(beta1, dtype)
            for p in filter(self._has_grad, group["params"]):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float()
                m = _moment_update(state["exp_avg"], grad, beta1, beta1_rounded)
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss


def factored_dims(shape: Sequence[int], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(largest axis, second-largest axis) when both are >= `min_dim_size_to_factor`, else None.

    Ties go as numpy's stable argsort in optax: among equal sizes the later axis counts as larger.
    In 2-D a tie only swaps which statistics are the rows and which the columns (the update is
    the same); in a 3-D attention kernel it picks other axes, hence `factor_view`.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    largest, second = order[-1], order[-2]
    if shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


def factor_view(shape: Sequence[int], perm: Sequence[int], stacked: int = 0) -> dict[str, Any]:
    """One entry of a param group's `factor_views` for `AdafactorBV`: the tensor seen as the
    kernel(s) big_vision would hold. Reshape it to `shape`, permute the axes by `perm`; the first
    `stacked` axes (which `perm` keeps in front) index separate kernels, each factored (and update
    clipped) on its own, as optax treats each of big_vision's tensors. A plain dict of lists,
    because the checkpoint code writes param groups as JSON."""
    shape, perm = [int(s) for s in shape], [int(a) for a in perm]
    if sorted(perm) != list(range(len(shape))) or perm[:stacked] != list(range(stacked)) \
            or not 0 <= stacked <= len(shape):
        raise ValueError(f"not a factoring view: shape {shape}, perm {perm}, stacked {stacked}")
    return {"shape": shape, "perm": perm, "stacked": stacked}


class _Kernel:
    """A parameter of shape `shape` through its factoring view (None: the tensor as it is)."""

    def __init__(self, shape: Sequence[int], view: dict[str, Any] | None) -> None:
        self.param_shape = tuple(shape)
        if view is None:
            view = {"shape": shape, "perm": range(len(shape)), "stacked": 0}
        self.shape, self.perm, self.stacked = tuple(view["shape"]), tuple(view["perm"]), view["stacked"]
        if math.prod(self.shape) != math.prod(self.param_shape):
            raise ValueError(f"factoring view {list(self.shape)} does not fit a tensor of shape "
                             f"{list(self.param_shape)}")
        self.kernel_shape = tuple(self.shape[a] for a in self.perm)
        self.inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
        self.blocks = math.prod(self.kernel_shape[:self.stacked])

    def factored_dims(self, min_dim_size_to_factor: int) -> tuple[int, int] | None:
        dims = factored_dims(self.kernel_shape[self.stacked:], min_dim_size_to_factor)
        return None if dims is None else (dims[0] + self.stacked, dims[1] + self.stacked)

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the view's `shape` in big_vision's axis order."""
        return t.permute(self.perm)

    def from_kernel(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(self.inverse)

    def state_shapes(self, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor AdafactorBV keeps for this parameter."""
        shapes = {}
        dims = self.factored_dims(group["min_dim_size_to_factor"])
        if dims is None:
            shapes["exp_avg_sq"] = self.param_shape
        else:
            shapes["exp_avg_sq_r"] = _keep(self.kernel_shape, dims[0])
            shapes["exp_avg_sq_c"] = _keep(self.kernel_shape, dims[1])
        if group["momentum"] is not None:
            shapes["exp_avg"] = self.param_shape
        return shapes


@functools.lru_cache(maxsize=4096)
def _cached_kernel(shape: tuple[int, ...], view: tuple | None) -> _Kernel:
    return _Kernel(shape, None if view is None else dict(zip(("shape", "perm", "stacked"), view)))


def _kernel(shape: Sequence[int], view: dict[str, Any] | None) -> _Kernel:
    """`_Kernel(shape, view)`, built once per (shape, view): `step` needs one per tensor."""
    key = None if view is None else (tuple(view["shape"]), tuple(view["perm"]), view["stacked"])
    return _cached_kernel(tuple(shape), key)


def _keep(shape: Sequence[int], reduced: int) -> tuple[int, ...]:
    return tuple(1 if i == reduced else s for i, s in enumerate(shape))


def _views(group: dict[str, Any]) -> list[dict[str, Any] | None]:
    return group.get("factor_views") or [None] * len(group["params"])


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
       `momentum_dtype` (bfloat16 by default) as optax's `ema` keeps it (module docstring);
       `momentum=None` drops it (update = u).
    6. theta <- theta * (1 - decay_lr * weight_decay) - lr * m. lr is the group's current lr
       (scheduled, times its lr_mult); decay_lr is the group's `scheduled_lr` when present (the
       scheduled lr before lr_mult, which `apply_lr` sets), else lr. No relative step size.

    Which tensor is factored how is decided on big_vision's layout when a param group carries
    `factor_views` (one `factor_view` or None per parameter; `build_optimizer` gives each
    attention kernel big_vision's per-head q / k / v / out shape): steps 3 and 4 then act on each
    of those kernels as optax does. Without views every tensor is taken as it is.

    Weight decay convention: big_vision's θ -= s(t) * (lr * lr_mult * m + wd_bv * θ), the
    decay multiplied by the schedule s(t) but neither by lr_mult nor by lr; here
    weight_decay = wd_bv / base_lr, which gives the same decay when scheduled_lr = base_lr * s(t).
    big_vision's configs write wd_bv = 0.03 * lr (body) and 3.0 * lr (head) for ViT-g, which is
    weight_decay = 0.03 and 3.0 here. timm's `AdafactorBigVision` with its default
    unscaled_wd=False multiplies the decay by its group lr, the same as here when lr_mult is 1.

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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        views = _views(group)
        if len(views) != len(group["params"]):
            raise ValueError(f"factor_views has {len(views)} entries for {len(group['params'])} params")
        for p, view in zip(group["params"], views):
            _kernel(p.shape, view)  # raises on a view that does not fit

    def _init_state(self, p: torch.Tensor, kernel: _Kernel, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for key, shape in kernel.state_shapes(group).items():
            if key == "exp_avg":
                state[key] = torch.zeros_like(p, dtype=_dtype(group["momentum_dtype"]))
            elif key == "exp_avg_sq":
                state[key] = torch.zeros_like(p, dtype=torch.float32)
            else:
                state[key] = p.new_zeros(shape, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["momentum"]
            decay_lr = group.get("scheduled_lr", lr)
            clip = group["clipping_threshold"]
            if beta1 is not None:
                beta1_rounded = _rounded(beta1, _dtype(group["momentum_dtype"]))
            for p, view in zip(group["params"], _views(group)):
                if not self._has_grad(p):
                    continue
                kernel = _kernel(p.shape, view)
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, kernel, group))
                beta2 = min(group["beta2_cap"], 1.0 - (state["step"] + 1) ** -group["decay_rate"])
                state["step"] += 1
                grad = p.grad.float()
                dims = kernel.factored_dims(group["min_dim_size_to_factor"])
                if dims is None:
                    v = state["exp_avg_sq"].mul_(beta2).add_(
                        grad.square().add_(group["eps"]).mul_(1 - beta2))
                    update = grad * v.rsqrt()
                else:
                    # Averages over the reshaped gradient (no copy), the statistics kept in
                    # big_vision's axis order: `largest` and `second` are axes of that order.
                    largest, second = dims
                    g = grad.reshape(kernel.shape)
                    grad_sq = g.square().add_(group["eps"])
                    r = state["exp_avg_sq_r"].mul_(beta2).add_(kernel.to_kernel(
                        grad_sq.mean(dim=kernel.perm[largest], keepdim=True)).mul_(1 - beta2))
                    c = state["exp_avg_sq_c"].mul_(beta2).add_(kernel.to_kernel(
                        grad_sq.mean(dim=kernel.perm[second], keepdim=True)).mul_(1 - beta2))
                    row_factor = (r / r.mean(dim=second, keepdim=True)).rsqrt_()
                    update = (g * kernel.from_kernel(row_factor)
                              * kernel.from_kernel(c.rsqrt())).reshape(p.shape)
                if clip is not None:
                    # One RMS per big_vision kernel (optax clips each tensor of its tree).
                    blocks = update.reshape(kernel.blocks, -1)
                    rms = blocks.square().mean(dim=1, keepdim=True).sqrt()
                    update = (blocks / (rms / clip).clamp_(min=1.0)).reshape(p.shape)
                if beta1 is not None:
                    update = _moment_update(state["exp_avg"], update, beta1, beta1_rounded)
                if wd != 0:
                    p.mul_(1 - decay_lr * wd)
                p.add_(update, alpha=-lr)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, after checking that every saved state tensor has the shape this optimizer
        gives it (one-line CheckpointError otherwise). The factoring views stay this optimizer's:
        they come from the model, not from the file."""
        self._check_state_shapes(state_dict)
        views = [group.get("factor_views") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, group_views in zip(self.param_groups, views):
            group.pop("factor_views", None)
            if group_views is not None:
                group["factor_views"] = group_views

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict says so
        for group, saved in zip(self.param_groups, saved_groups):
            names = group.get("param_names") or [f"parameter {i}" for i in range(len(group["params"]))]
            for name, p, view, pid in zip(names, group["params"], _views(group), saved["params"]):
                found = {key: tuple(value.shape) for key, value in state_dict["state"].get(pid, {}).items()
                         if torch.is_tensor(value) and key != "step"}
                # The saved group's hyperparameters (momentum, min_dim_size_to_factor) apply after loading.
                expected = _kernel(p.shape, view).state_shapes(saved)
                if found and found != expected:
                    raise CheckpointError(
                        f"the checkpoint's adafactor_bv state for {name} has shapes {found}, but "
                        f"this optimizer keeps {expected} (it was factored in another layout, e.g. "
                        "by a vitscale that factored fused attention kernels whole instead of per "
                        "head as big_vision); the statistics cannot be converted exactly: resume "
                        "with the vitscale that wrote the checkpoint, or start a new run from its "
                        "weights (model.init) with a fresh optimizer")


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
