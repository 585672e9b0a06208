"""Memory-lean optimizers of Scaling ViT: Adam with a bfloat16 first moment, and big_vision's
Adafactor (factored second moment, bf16 momentum, decoupled weight decay).

The first moment follows optax (`scale_by_adam(mu_dtype=...)`, `ema(accumulator_dtype=...)`) dtype
by dtype: m = (1 - b1) * g + b1 * m_prev, where b1 * m_prev is a product in the moment's dtype,
b1 itself rounded to it (0.9 is 0.8984375 in bf16), and the sum is fp32. The step's update uses
that fp32 sum; the state keeps its rounding. Those are the dtypes the optax program states, and
what optax computes op by op. Under jit XLA may keep the bf16 product in fp32 ("excess
precision", on by default); on CPU that moves a 25-step bf16 run by about half as much as
rounding b1 does (tests/test_optim.py compares with it off).

Sharded parameters (FSDP2's `fully_shard`, DTensor tensor parallelism: `p` and `p.grad` are
DTensors) give the parameters the same optimizer gives the whole tensors, to float summation
order. Both optimizers compute on each rank's local shard (`to_local()`), so their elementwise
arithmetic is the single-process one, and keep param-shaped state as DTensors in the parameter's
placements (what torch.distributed.checkpoint saves and reshards). What crosses ranks each step:

- AdamBF16 (like torch's AdamW and SGD on DTensors): nothing.
- AdafactorBV, per tensor a mesh dim shards (a mesh dim that replicates it needs nothing): its
  row and column statistics, full size (numel / largest + numel / second-largest kernel axis
  floats, one buffer), all-reduced over each such mesh dim: each shard sums its entries of the
  means, the all-reduce adds the shards, and every rank then holds the statistics the unsharded
  tensor has (kept as replicated DTensors); with update clipping also one float per kernel (its
  sum of squares, for the global RMS). Unfactored tensors need nothing but that clipping sum.
  No gradient or parameter is gathered, whatever the placements (Shard on any axis, uneven
  chunks, empty shards, `_StridedShard`, 2-D meshes), except for a factoring view that merges
  tensor axes (vitscale's views only split them), where the sums gather the gradient. These
  are small collectives, one or two per sharded tensor and mesh dim, not bucketed across
  tensors.

A gradient in other placements than its parameter's (a Partial sum) is redistributed to them
first. Statistics are summed in another order than the single-process means, so they and the
parameters agree to float rounding (~1e-7 relative), not bitwise; a bf16 momentum entry then
now and then rounds one bf16 step the other way. Plain tensors take the code path they always did.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from vitscale.errors import CheckpointError
from vitscale.utils.tensors import is_dtensor
from vitscale.utils.tensors import local as local_shard

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


# ---------------------------------------------------------------------------- DTensor parameters
def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """p.grad in p's local layout: the local shard of a DTensor gradient in p's placements
    (redistributed first when it has others, e.g. a Partial sum)."""
    grad = p.grad
    if not is_dtensor(p):
        return grad
    if not is_dtensor(grad):
        raise RuntimeError(f"a DTensor parameter {tuple(p.shape)} has a {type(grad).__name__} gradient")
    if grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad.to_local()


def _zeros_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros_like(p, dtype=dtype); of a DTensor, built from local zeros (a DTensor op
    would first propagate the sharding)."""
    if not is_dtensor(p):
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(torch.zeros_like(p.to_local(), dtype=dtype), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def _replicated(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """t (the same on every rank) as a DTensor replicated over p's mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)


def _dtensor_state(p: torch.Tensor, state: dict[str, Any]) -> None:
    """State of a DTensor parameter as DTensors: param-shaped tensors in p's placements, the rest
    (AdafactorBV's statistics) replicated. This optimizer creates them so; a plain
    `load_state_dict` of a whole-tensor state (the same on every rank) leaves plain tensors,
    which are split here without communication."""
    from torch.distributed.tensor import distribute_tensor

    for key, value in state.items():
        if key == "step" or not torch.is_tensor(value) or is_dtensor(value):
            continue
        value = value.to(local_shard(p).device)
        state[key] = (distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                      if value.shape == p.shape else _replicated(value, p))


def _shard_like(placement: Any) -> bool:
    from torch.distributed.tensor import Shard

    try:  # private, and not a Shard in every torch version
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover
        return isinstance(placement, Shard)
    return isinstance(placement, (Shard, _StridedShard))


def _split_axes(shape: Sequence[int], view_shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """For each axis of `shape`, the range of axes of `view_shape` that a reshape splits it
    into; None when the reshape merges axes."""
    groups, v = [], 0
    for n in shape:
        start, size = v, 1
        while size < n and v < len(view_shape):
            size *= view_shape[v]
            v += 1
        if size != n:
            return None
        groups.append((start, v))
    if any(s != 1 for s in view_shape[v:]):
        return None
    if groups:  # trailing size-1 view axes
        groups[-1] = (groups[-1][0], len(view_shape))
    return groups


class _Shards:
    """Where a DTensor parameter's local shard lies in the tensor seen through its factoring
    view, and the sums over view axes across shards that AdafactorBV needs.

    The shard is a set of indices along each tensor axis (Shard / _StridedShard on that axis by
    one or more mesh dims, uneven chunks, empty shards), read off DTensor's own split of an
    arange (`distribute_tensor(..., src_data_rank=None)`: no communication). A sum over view
    axes is summed locally into the full shape of the result (each shard adds into the entries
    its elements belong to: index_add along the tensor axis that holds the summed view axes),
    then all-reduced over each mesh dim that shards the tensor: every rank holds the full sums.
    `expand` takes such a full statistic back to the shard's entries (index_select). (On CUDA
    index_add_ adds in a fixed order only under torch.use_deterministic_algorithms, which
    training's deterministic=true sets.)"""

    def __init__(self, p: torch.Tensor, view_shape: Sequence[int]) -> None:
        self.shape, self.view_shape = tuple(p.shape), tuple(view_shape)
        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        if any(pl.is_partial() for pl in self.placements):
            raise RuntimeError(f"a parameter with Partial placements {self.placements}")
        spec = getattr(p, "_spec", None)
        order = getattr(spec, "shard_order", None)
        if order is not None and order != type(spec).compute_default_shard_order(spec.placements):
            # DTensor's explicit shard orders are not made by any vitscale layout (FSDP2, TP).
            raise NotImplementedError(f"adafactor_bv: a DTensor parameter with the non-default "
                                      f"shard order {order} is not supported")
        self.mesh_dims = [i for i, pl in enumerate(self.placements) if _shard_like(pl)]
        local = local_shard(p)
        self.device = local.device
        self.index = [self._axis_index(axis) for axis in range(len(self.shape))]
        for axis, index in enumerate(self.index):
            if index is not None and len(index) != local.shape[axis]:
                raise RuntimeError(f"cannot place the local shard {tuple(local.shape)} of a DTensor "
                                   f"{self.shape} with placements {self.placements}")
        self.axes = _split_axes(self.shape, self.view_shape)
        self._targets: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def _axis_index(self, axis: int) -> torch.Tensor | None:
        from torch.distributed.tensor import Replicate, distribute_tensor

        on_axis = [pl if _shard_like(pl) and pl.dim == axis else Replicate() for pl in self.placements]
        if all(isinstance(pl, Replicate) for pl in on_axis):
            return None
        n = self.shape[axis]
        arange = torch.arange(n).view([n if a == axis else 1 for a in range(len(self.shape))])
        return distribute_tensor(arange, self.mesh, on_axis, src_data_rank=None).to_local().reshape(-1)

    def _kept(self, axis: int, summed: Sequence[int]) -> int:
        start, stop = self.axes[axis]
        return math.prod(self.view_shape[v] for v in range(start, stop) if v not in summed)

    def _target(self, axis: int, summed: tuple[int, ...]) -> torch.Tensor:
        """For each local index along tensor `axis`, its index along that axis of the sums over
        the view axes `summed` (which are among the axes `axis` splits into)."""
        key = (axis, summed)
        if key not in self._targets:
            start, stop = self.axes[axis]
            index = self.index[axis]
            index = torch.arange(self.shape[axis], device=self.device) if index is None else index
            target, stride = torch.zeros_like(index), 1
            for v in reversed(range(start, stop)):
                size = self.view_shape[v]
                if v not in summed:
                    target += index % size * stride
                    stride *= size
                index = index // size
            self._targets[key] = target
        return self._targets[key]

    def _summed(self, axis: int, axes: Sequence[int]) -> tuple[int, ...]:
        start, stop = self.axes[axis]
        return tuple(v for v in range(start, stop) if v in axes)

    def sums(self, x: torch.Tensor, axes_list: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """For each tuple of view axes, the sum of the (whole, unsharded) tensor whose local
        shard is x over those axes, in the view's shape with 1 on them; one all-reduce for all
        (per mesh dim that shards the tensor)."""
        shapes = [tuple(1 if v in axes else s for v, s in enumerate(self.view_shape)) for axes in axes_list]
        if self.axes is None:  # a view that merges tensor axes: gather the tensor
            from torch.distributed.tensor import DTensor

            whole = DTensor.from_local(x, self.mesh, self.placements, shape=self.shape,
                                       stride=torch.empty(self.shape, device="meta").stride()).full_tensor()
            whole = whole.reshape(self.view_shape)
            return [whole.sum(dim=tuple(axes), keepdim=True) for axes in axes_list]
        parts = [self._local_sum(x, axes) for axes in axes_list]
        flat = torch.cat([part.reshape(-1) for part in parts])
        import torch.distributed as dist

        for mesh_dim in self.mesh_dims:
            dist.all_reduce(flat, group=self.mesh.get_group(mesh_dim))
        out, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            out.append(flat[offset:offset + size].view(shape))
            offset += size
        return out

    def _local_sum(self, x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
        """This shard's part of the sum over view axes `axes`, in the tensor's axes (each of
        them the kept view axes it splits into, flattened), zero where other shards add."""
        y = x
        for axis in range(len(self.shape)):  # sum first, while the tensor shrinks
            summed = self._summed(axis, axes)
            if not summed:
                continue
            kept = self._kept(axis, summed)
            start, stop = self.axes[axis]
            if kept == 1:
                y = y.sum(dim=axis, keepdim=True)
            elif self.index[axis] is None:  # a whole axis: sum its view axes as they are
                dims = tuple(axis + v - start for v in summed)
                y = y.unflatten(axis, self.view_shape[start:stop]).sum(dim=dims, keepdim=True)
                y = y.flatten(axis, axis + stop - start - 1)
            else:
                y = y.new_zeros(y.shape[:axis] + (kept,) + y.shape[axis + 1:]).index_add_(
                    axis, self._target(axis, summed), y)
        for axis, index in enumerate(self.index):  # then place the shard's entries
            if index is not None and not self._summed(axis, axes):
                y = y.new_zeros(y.shape[:axis] + (self.shape[axis],) + y.shape[axis + 1:]).index_copy_(
                    axis, index, y)
        return y

    def expand(self, stat: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
        """A statistic of the view's shape with 1 on `axes`, at this shard's entries: a tensor
        that broadcasts against the local shard."""
        if self.axes is None:
            return self.local(stat.expand(self.view_shape).reshape(self.shape))
        y = stat.reshape([self._kept(axis, self._summed(axis, axes)) for axis in range(len(self.shape))])
        for axis, index in enumerate(self.index):
            summed = self._summed(axis, axes)
            if summed:
                if self._kept(axis, summed) > 1:
                    y = y.index_select(axis, self._target(axis, summed))
            elif index is not None:
                y = y.index_select(axis, index)
        return y

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """The local shard of a whole tensor of the parameter's shape."""
        for axis, index in enumerate(self.index):
            if index is not None:
                whole = whole.index_select(axis, index)
        return whole


# id(parameter) -> (weak reference to it, layout key, _Shards or None); an entry goes with its
# parameter. (Not a WeakKeyDictionary: that compares tensors with ==.)
_SHARDS: dict[int, tuple[weakref.ref, tuple, _Shards | None]] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    if _SHARDS.get(key, (None,))[0] is ref:
        del _SHARDS[key]


def _shards(p: torch.Tensor, view_shape: Sequence[int]) -> _Shards | None:
    """`_Shards` of a DTensor parameter through a view (built once per parameter and layout), or
    None when no mesh dim shards it (its local tensor is the whole tensor)."""
    layout = (tuple(p.shape), tuple(view_shape), id(p.device_mesh), tuple(p.placements))
    cached = _SHARDS.get(id(p))
    if cached is None or cached[0]() is not p or cached[1] != layout:
        shards = _Shards(p, view_shape)
        ref = weakref.ref(p, functools.partial(_forget, key=id(p)))
        cached = (ref, layout, shards if shards.mesh_dims else None)
        _SHARDS[id(p)] = cached
    return cached[2]


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
                    state["exp_avg"] = _zeros_like(p, dtype)
                    state["exp_avg_sq"] = _zeros_like(p, torch.float32)
                elif is_dtensor(p):
                    _dtensor_state(p, state)
                state["step"] += 1
                t = state["step"]
                # Elementwise: a DTensor's local shards (the moments are DTensors like p).
                grad = _local_grad(p).float()
                m = _moment_update(local_shard(state["exp_avg"]), grad, beta1, beta1_rounded)
                v = local_shard(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                param = local_shard(p)
                if wd != 0:
                    param.mul_(1 - lr * wd)
                param.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
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
       A fresh optimizer stepped with every group's lr 0 does not decay (that is how
       torch.distributed.checkpoint's get_optimizer_state_dict creates the state).

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
    statistics; unfactored tensors keep a full fp32 second moment (4 bytes/param). On DTensor
    parameters (module docstring) the momentum and full second moments are sharded like the
    parameter, the row and column statistics whole on every rank (replicated DTensors).
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
        """Zeros; for a DTensor p, param-shaped state is a DTensor in p's placements and the
        row / column statistics are whole on every rank (replicated DTensors)."""
        state: dict[str, Any] = {"step": 0}
        for key, shape in kernel.state_shapes(group).items():
            if key == "exp_avg":
                state[key] = _zeros_like(p, _dtype(group["momentum_dtype"]))
            elif key == "exp_avg_sq":
                state[key] = _zeros_like(p, torch.float32)
            elif is_dtensor(p):
                zeros = torch.zeros(shape, dtype=torch.float32, device=local_shard(p).device)
                state[key] = _replicated(zeros, p)
            else:
                state[key] = p.new_zeros(shape, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self._closure_loss(closure)
        # torch.distributed.checkpoint's get_optimizer_state_dict creates a fresh optimizer's
        # state by stepping it with zero gradients and every lr set to 0: decaying by
        # scheduled_lr (which it leaves) would then move the parameters.
        initializing = not self.state and all(group["lr"] == 0 for group in self.param_groups)
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["momentum"]
            decay_lr = 0.0 if initializing else group.get("scheduled_lr", lr)
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
                elif is_dtensor(p):
                    _dtensor_state(p, state)
                beta2 = min(group["beta2_cap"], 1.0 - (state["step"] + 1) ** -group["decay_rate"])
                state["step"] += 1
                # A DTensor's local shard; `shards` sums across shards where a mean or an RMS
                # spans them (None: a plain tensor, or a DTensor whole on every rank).
                grad = _local_grad(p).float()
                dims = kernel.factored_dims(group["min_dim_size_to_factor"])
                shards = (_shards(p, kernel.shape) if is_dtensor(p) and (dims or clip is not None)
                          else None)
                if dims is None:
                    v = local_shard(state["exp_avg_sq"]).mul_(beta2).add_(
                        grad.square().add_(group["eps"]).mul_(1 - beta2))
                    update = grad * v.rsqrt()
                elif shards is None:
                    # Averages over the reshaped gradient (no copy), the statistics kept in
                    # big_vision's axis order: `largest` and `second` are axes of that order.
                    largest, second = dims
                    g = grad.reshape(kernel.shape)
                    grad_sq = g.square().add_(group["eps"])
                    r = local_shard(state["exp_avg_sq_r"]).mul_(beta2).add_(kernel.to_kernel(
                        grad_sq.mean(dim=kernel.perm[largest], keepdim=True)).mul_(1 - beta2))
                    c = local_shard(state["exp_avg_sq_c"]).mul_(beta2).add_(kernel.to_kernel(
                        grad_sq.mean(dim=kernel.perm[second], keepdim=True)).mul_(1 - beta2))
                    row_factor = (r / r.mean(dim=second, keepdim=True)).rsqrt_()
                    update = (g * kernel.from_kernel(row_factor)
                              * kernel.from_kernel(c.rsqrt())).reshape(p.shape)
                else:
                    update = self._sharded_factored(grad, state, kernel, dims, shards, beta2, group["eps"])
                if clip is not None and shards is None:
                    # One RMS per big_vision kernel (optax clips each tensor of its tree).
                    blocks = update.reshape(kernel.blocks, -1)
                    rms = blocks.square().mean(dim=1, keepdim=True).sqrt()
                    update = (blocks / (rms / clip).clamp_(min=1.0)).reshape(p.shape)
                elif clip is not None:
                    # The same RMS per kernel, its sum of squares summed across shards.
                    within = tuple(range(kernel.stacked, len(kernel.shape)))
                    (sum_sq,) = shards.sums(update.square(), [within])
                    rms = sum_sq.div_(math.prod(kernel.shape[kernel.stacked:])).sqrt_()
                    update = update / shards.expand((rms / clip).clamp_(min=1.0), within)
                param = local_shard(p)
                if beta1 is not None:
                    update = _moment_update(local_shard(state["exp_avg"]), update, beta1, beta1_rounded)
                if wd != 0:
                    param.mul_(1 - decay_lr * wd)
                param.add_(update, alpha=-lr)
        return loss

    @staticmethod
    def _sharded_factored(grad: torch.Tensor, state: dict[str, Any], kernel: _Kernel,
                          dims: tuple[int, int], shards: _Shards, beta2: float,
                          eps: float) -> torch.Tensor:
        """The factored update of a DTensor's local shard `grad`: the row and column means of
        the whole gradient through `shards` (one all-reduce of both), so the statistics, whole
        on every rank, are the unsharded ones; then the shard's entries of the factors."""
        largest, second = dims
        rows, cols = kernel.perm[largest], kernel.perm[second]  # view axes
        grad_sq = grad.square().add_(eps)
        row_sum, col_sum = shards.sums(grad_sq, [(rows,), (cols,)])
        r = local_shard(state["exp_avg_sq_r"]).mul_(beta2).add_(
            kernel.to_kernel(row_sum.div_(kernel.shape[rows])).mul_(1 - beta2))
        c = local_shard(state["exp_avg_sq_c"]).mul_(beta2).add_(
            kernel.to_kernel(col_sum.div_(kernel.shape[cols])).mul_(1 - beta2))
        row_factor = (r / r.mean(dim=second, keepdim=True)).rsqrt_()
        return (grad * shards.expand(kernel.from_kernel(row_factor), (rows,))
                * shards.expand(kernel.from_kernel(c.rsqrt()), (cols,)))

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
    """Total bytes of the tensors in an optimizer's per-parameter state (moments, step tensors);
    of a DTensor, its local shard: the bytes this rank holds."""
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            value = local_shard(value)
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
