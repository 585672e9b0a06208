"""Bytes of parameters, gradients and optimizer state one process holds, from shapes alone.

The model is built once on the meta device (nothing allocated; 0.3 s for 22B/14) for its
parameter names and shapes and for the optimizer's own parameter groups (`build_optimizer`:
weight-decay groups, AdafactorBV's factoring views). Each parameter's local shard follows the
layout vitscale.parallel gives it:

- tensor parallelism (parallel/tp.py `apply_tp`): fused qkv / kv weights split per head on
  dim 0 (their biases whole), fc1 and the MAP head's q column-wise (dim 0, with their biases),
  proj / fc2 weights row-wise (dim 1); everything else (stem, norms, biases after a row-wise
  layer, head) replicated;
- FSDP2 (`fully_shard` over dp_shard; HSDP replicas hold the same) on dim 0 of that local
  tensor, dim 1 for the fused weights under TP (`fsdp_shard_placement`), in torch.chunk's
  pieces: ceil(n / k) rows per rank, the last ranks fewer or none.

tests/test_plan_states.py checks every figure against the real tensors of `vitscale train`'s
layouts on CPU processes.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from vitscale.parallel.mesh import Layout

FP32 = 4

# Parameter name -> (TP split dim, heads-strided groups); None: replicated over the TP ranks.
_TP_RULES: list[tuple[re.Pattern[str], int, int]] = [
    # the fused qkv / kv weights per head; their biases stay whole (parallel/tp.py
    # _FusedColwise: each rank adds its slice)
    (re.compile(r"(^|\.)attn\.qkv\.weight$"), 0, 3),
    (re.compile(r"(^|\.)attn_pool\.kv\.weight$"), 0, 2),
    (re.compile(r"(^|\.)(mlp\.fc1|attn_pool\.q)\.(weight|bias)$"), 0, 1),
    (re.compile(r"(^|\.)(attn\.proj|attn_pool\.proj|mlp\.fc2)\.weight$"), 1, 1),
]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # the dim tensor parallelism splits, None: replicated
    tp_groups: int  # 3 (qkv) / 2 (kv): split per head inside each of q, k, v


def tp_rule(name: str) -> tuple[int | None, int]:
    for pattern, dim, groups in _TP_RULES:
        if pattern.search(name):
            return dim, groups
    return None, 1


def chunk(n: int, k: int, i: int) -> int:
    """The size of piece i of torch.chunk(range(n), k) (0 when there is none)."""
    size = -(-n // k)
    return max(0, min(size, n - i * size))


def local_shape(p: Param, layout: Layout, shard_index: int, tp_index: int) -> tuple[int, ...]:
    """The shape of the shard of p held by the process at (dp_shard index, tp index)."""
    shape = list(p.shape)
    if layout.tp > 1 and p.tp_dim is not None:
        n = shape[p.tp_dim]
        if p.tp_groups > 1:  # heads divide by tp (check_tp), so every group splits evenly
            shape[p.tp_dim] = n // layout.tp
        else:
            shape[p.tp_dim] = chunk(n, layout.tp, tp_index)
    if layout.dp_shard > 1:
        dim = 1 if layout.tp > 1 and p.tp_groups > 1 and len(shape) > 1 else 0
        shape[dim] = chunk(shape[dim], layout.dp_shard, shard_index)
    return tuple(shape)


_CACHE: dict[tuple, object] = {}  # configs are dataclasses with lists: keyed by repr


def _cached(key: tuple, make):
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


@contextlib.contextmanager
def _shapes_only():
    """torch.nn.init's fills as no-ops while a model is built on meta: the planner reads shapes
    only, and torch's meta fills go through its decompositions, whose first use imports
    torch._dynamo (1.7 s of a 2 s `vitscale plan`). Global while it lasts (one meta build)."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fill in saved.items():
            setattr(init, n, fill)


def meta_model(cfg) -> tuple[torch.nn.Module, tuple[Param, ...]]:
    """(the model of cfg on the meta device, its parameters), built once per config."""
    from vitscale.models.registry import build

    def make():
        with torch.device("meta"), _shapes_only():
            model = build(cfg)
        return model, tuple(Param(n, tuple(t.shape), *tp_rule(n))
                            for n, t in model.named_parameters())

    return _cached(("model", repr(cfg)), make)


@dataclass(frozen=True)
class ModelState:
    """Bytes one process holds for the whole run (not per step)."""

    params: int
    grads: int
    optimizer: int
    params_numel: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _state_layout(cfg, optim_cfg) -> tuple:
    """((name, bytes per local element, bytes whole on every rank), ...) of the state
    `build_optimizer(model, optim_cfg)` holds after its first step."""
    return _cached(("state", repr(cfg), repr(optim_cfg)), lambda: _describe(cfg, optim_cfg))


def _describe(cfg, optim_cfg) -> tuple:
    import inspect

    from vitscale.optim import optimizer_spec
    from vitscale.optim.optimizers import _DTYPES, _kernel

    model, _ = meta_model(cfg)
    # The groups and settings build_optimizer passes, over the class's defaults, as the
    # optimizer would hold them (constructing a torch optimizer imports torch._dynamo: 3 s).
    cls, groups, settings = optimizer_spec(model, optim_cfg)
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(settings)
    out = []
    for group in ({**defaults, **g} for g in groups):
        names = group["param_names"]
        views = group.get("factor_views") or [None] * len(names)
        for name, p, view in zip(names, group["params"], views):
            if optim_cfg.name == "adamw":  # exp_avg, exp_avg_sq (fp32) and a 0-d fp32 step
                out.append((name, 2 * FP32, FP32))
            elif optim_cfg.name == "adam_bf16":  # bf16 first moment, fp32 second; int step
                out.append((name, 2 + FP32, 0))
            elif optim_cfg.name == "sgd":  # torch's momentum buffer, once momentum > 0
                out.append((name, FP32 if group["momentum"] else 0, 0))
            else:  # adafactor_bv: its own state shapes; row / column statistics whole
                per_element = whole = 0
                for key, shape in _kernel(p.shape, view).state_shapes(group).items():
                    if key == "exp_avg":
                        per_element += _DTYPES[group["momentum_dtype"]].itemsize
                    elif key == "exp_avg_sq":
                        per_element += FP32
                    else:
                        whole += FP32 * math.prod(shape)
                out.append((name, per_element, whole))
    return tuple(out)


def optimizer_bytes(cfg, optim_cfg, local: dict[str, tuple[int, ...]]) -> int:
    """Bytes of optimizer state for parameters whose local shards have the shapes `local`."""
    layout = _state_layout(cfg, optim_cfg)
    return sum(per * math.prod(local[name]) + whole for name, per, whole in layout)


def model_state(cfg, optim_cfg, layout: Layout, rank: int = 0) -> ModelState:
    """Parameters (fp32 master weights), gradients (fp32, sharded like them) and optimizer
    state of the process `rank` of a `layout` run (ranks as vitscale.parallel.build_mesh lays
    them out: dp_replicate x dp_shard x tp, tp the fastest). Rank 0 holds the most: the
    first of torch.chunk's pieces are the largest."""
    _, params = meta_model(cfg)
    tp_index = rank % layout.tp
    shard_index = (rank // layout.tp) % layout.dp_shard
    local = {p.name: local_shape(p, layout, shard_index, tp_index) for p in params}
    numel = sum(math.prod(s) for s in local.values())
    return ModelState(params=FP32 * numel, grads=FP32 * numel,
                      optimizer=optimizer_bytes(cfg, optim_cfg, local), params_numel=numel)


def block_params(cfg, layout: Layout) -> tuple[int, int]:
    """(elements of the largest transformer block, elements outside the blocks) as FSDP2
    all-gathers them over dp_shard: this TP rank's share, each tensor's dim 0 padded to a
    multiple of dp_shard (every rank sends an equal piece; a position embedding of dim 0 size
    1 gathers dp_shard rows)."""
    _, params = meta_model(cfg)
    per_block: dict[str, int] = {}
    root = 0
    k = layout.dp_shard
    for p in params:
        m = re.match(r"^((?:blocks|stages\.\d+)\.\d+)\.", p.name)
        shape = list(local_shape(p, Layout(tp=layout.tp), 0, 0))
        dim = 1 if layout.tp > 1 and p.tp_groups > 1 and len(shape) > 1 else 0
        shape[dim] = -(-shape[dim] // k) * k
        numel = math.prod(shape)
        if m:
            per_block[m.group(1)] = per_block.get(m.group(1), 0) + numel
        else:
            root += numel
    return max(per_block.values(), default=0), root


def param_count(cfg) -> int:
    """The model's parameter count."""
    return sum(math.prod(p.shape) for p in meta_model(cfg)[1])
