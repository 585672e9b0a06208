"""Tensor parallelism (Megatron-LM's plan, torchtitan-style) for a vitscale VisionTransformer,
applied from outside: `apply_tp` turns a plain model's parameters into DTensors on a 1-D `tp`
mesh and installs the layout changes as module hooks (torch.distributed.tensor.parallel), so
the model files stay free of parallel code and parameter names and full shapes do not change
(`state_dict()[k].full_tensor()` equals the plain model's tensor).

What each rank holds (heads / tp of the heads; `mlp_dim / tp` of the MLP):

* attention: q, k and v of its heads. The fused `qkv` Linear's rows are laid out
  (3, heads, head_dim), so its weight is `_StridedShard(0, split_factor=3)`: the rows cut in 3
  (q | k | v), each third sharded over the ranks, rank r holding [q_r; k_r; v_r] (plain
  `Shard(0)` would give rank 0 all of q and half of k); its bias (3 x width numbers) is
  replicated, each rank adding its slice. `proj` row-wise.
  QK-norm (LayerNorm over head_dim) works per head: its weights are replicated.
* MLP: `fc1` column-wise, `fc2` row-wise.
* MAP head: `q` column-wise, the fused `kv` as qkv with split_factor 2, `proj` row-wise, its MLP
  as above; the probe `latent` replicated.
* everything else (patch embedding, class token, position embedding, block and final norms,
  pooling, pre-logits, classifier) replicated: `Replicate()` DTensors computed on every rank,
  so that every parameter is a DTensor on the tp mesh (a foreach optimizer step cannot mix
  plain tensors and DTensors) and the activations between modules stay plain tensors.

With sequence parallelism the token sequence (dim 1) is sharded from the first block's input
(so `num_tokens(model)` must divide by tp): the norms run on sequence shards; the full sequence
is all-gathered where attention / the MLP need it and reduce-scattered after `proj` / `fc2`;
it is gathered again after the final norm, before pooling.

What the plan communicates per block, measured with CommDebugMode (tests/test_parallel_tp.py
asserts these counts): AR all-reduce, AG all-gather, RS reduce-scatter, of a block's
(batch, tokens, width) activation (tokens / tp of them on each rank under SP):

| block                 | sequence_parallel | forward     | backward    |
|-----------------------|-------------------|-------------|-------------|
| sequential (`Block`)  | false             | 2 AR        | 2 AR        |
| sequential (`Block`)  | true              | 2 AG + 2 RS | 2 AG + 2 RS |
| parallel (ViT-22B)    | false             | 1 AR        | 1 AR        |
| parallel (ViT-22B)    | true              | 1 AG + 1 RS | 1 AG + 1 RS |

The parallel block's two branches read one normalised input (one DTensor, gathered once under
SP, whose two partial input gradients add up before one reduction), and their row-wise outputs
are partial sums, added (drop-path applied) before the one reduction.
Backward also reduces the gradients of replicated parameters that met sharded activations,
one small collective per tensor (width or head_dim elements): an AR for the QK-norm weight
and bias (per head) and, under SP, for the block norms' weight and bias (per token shard); an
AG for the fused qkv / kv bias (replicated, its gradient sharded). Without FSDP a gradient hook does
it, so that `p.grad` has `p`'s placements; under FSDP2 its post-backward does (the hooks go with
the parameters FSDP replaces). E.g. ViT-22B-style (QK-norm, no biases), no SP: 1 AR forward,
1 + 2 AR backward per block; with SP: 1 AG + 1 RS forward, 1 AG + 1 RS + 3 AR backward.
Outside the blocks: the MAP head 2 AR forward, 3 AR backward (kv, its MLP and the probe;
without biases); SP
one AG forward (the tokens for pooling) and one AG backward (the first block's input
gradient), plus the final norm's AR; the stem, pooling and classifier nothing.

Randomness: no random op runs on a DTensor (dropout, attention dropout and drop-path see plain
local tensors), so every mask comes from the process's own torch generator, and the ranks of a
TP group draw the same masks exactly when they are seeded alike (the trainer's job). That is
what replicated and partial-sum activations need (drop-path, a per-sample mask; dropout after
`proj` / `fc2` on the partial sums without SP): the forward, loss and gradients then equal the
one-process run's, drop-path included (tested). On sharded activations (attention dropout on a
rank's heads, dropout after `fc1` on its hidden units, under SP dropout after `proj` / `fc2`
on its tokens) the same generator state gives every rank the same mask pattern on different
units: valid dropout, but the tp shards' masks are correlated, and not the one-process run's
(Megatron-LM draws those from a per-rank generator). DTensor's own dropout would be no
different on CPU (measured: a Shard(0) DTensor gets the same mask on every rank, drawn from the
global generator); on CUDA it would use DTensor's OffsetBasedRNGTracker, which on first use
broadcasts rank 0's CUDA generator state to every rank of the default group, DP ranks included,
then draws each shard's part of one global mask (torch 2.14's code; not run here). The plan
never calls it. The recipes big
enough for TP (ViT-22B, Scaling ViT) use no dropout.

Also: the ranks of a TP group must get the same images (each computes the replicated stem);
the model runs at its built img_size only (its position embedding is a DTensor: another grid
is refused with a one-line error); `Attention.attention_weights` gives a rank's own heads;
`reset_head` after `apply_tp` would add a plain head, so change the head first. `apply_tp`
works on a model built on the meta device; on a real one the values of rank 0 of the TP group
are distributed (distribute_tensor).

FSDP2 on top (2-D mesh (dp_shard, tp), fully_shard on the dp_shard sub-mesh after apply_tp):
pass `shard_placement_fn=fsdp_shard_placement` to every fully_shard call (the fused weights
shard over dp on dim 1, which needs width % dp_shard == 0: `check_tp(..., dp_shard=)`), and
`check_fsdp_layout(model)` afterwards; see fsdp_shard_placement for why.

Checkpoints and initial weights: a `_StridedShard` tensor is not one contiguous chunk per
rank, and two torch APIs assume it is. torch.distributed.checkpoint (DCP) `save` of the raw
qkv / kv weights (and of their optimizer states) fails with "overlapping chunks":
save `dcp_layout(t)` of every tensor (the contiguous `Shard`, same values; the others pass
through), load into those, then `restore_layout(t, loaded)`. `set_model_state_dict(...,
broadcast_from_rank0=True)` silently loads the wrong rows into them: fill a sharded model from
rank 0's full weights with `load_full_state`. The full-state-dict gather
(`get_model_state_dict(..., full_state_dict=True)`, `full_tensor()`) is right as is. And
`_StridedShard(...).is_shard()` is False: code that counts a DTensor's copies by `is_shard()`
(e.g. a gradient norm summed over local shards) must count `_StridedShard` as a shard too.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

# Private: see _FusedColwise.
from torch.distributed.tensor.placement_types import _StridedShard

from vitscale.errors import ConfigError

__all__ = ["apply_tp", "check_fsdp_layout", "check_tp", "dcp_layout", "fsdp_shard_placement",
           "load_full_state", "num_tokens", "restore_layout"]


# ---------------------------------------------------------------------------------- checks
def num_tokens(model: nn.Module) -> int:
    """Tokens a block of `model` sees: the patches of its built img_size plus a class token."""
    cfg = model.cfg
    return cfg.num_patches + (1 if cfg.class_token else 0)


def _divisors(*values: int) -> list[int]:
    g = math.gcd(*values)
    return [t for t in range(1, g + 1) if g % t == 0]


def check_tp(model: nn.Module, tp: int, sequence_parallel: bool, *, dp_shard: int = 1) -> None:
    """Raise a one-line ConfigError (a UserError) when `model` cannot be tensor-parallel at
    degree `tp` (with `sequence_parallel`; with FSDP2 over `dp_shard` processes on top): the
    problem and the fix."""
    from vitscale.models.asvit import AsViT
    from vitscale.models.vit import VisionTransformer

    if tp < 1:
        raise ConfigError(f"parallel.tp={tp} must be >= 1")
    if isinstance(model, AsViT):
        raise ConfigError("tensor parallelism is not supported for As-ViT models (window "
                          "attention over a changing token grid); use parallel.dp_shard (FSDP) "
                          "instead of parallel.tp")
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"tensor parallelism is supported for vitscale VisionTransformer models "
                          f"only, not {type(model).__name__}; use parallel.dp_shard (FSDP) instead")
    cfg = model.cfg
    if cfg.stem == "hybrid":
        raise ConfigError("tensor parallelism is not supported for a hybrid ResNet stem "
                          "(model.stem=hybrid); use parallel.dp_shard (FSDP) instead of parallel.tp")
    if sequence_parallel and cfg.window_size:
        raise ConfigError("parallel.sequence_parallel=true cannot shard the token sequence of "
                          "window attention (model.window_size > 0: windows cut across the "
                          "shards); set parallel.sequence_parallel=false (tp alone works)")
    mlp_dims = [cfg.mlp_dim] + ([cfg.map_mlp_dim or cfg.mlp_dim] if cfg.pool == "map" else [])
    valid = _divisors(cfg.heads, cfg.width, *mlp_dims)
    where = "the blocks' and the MAP head's" if cfg.pool == "map" else "the blocks'"
    if cfg.heads % tp:
        raise ConfigError(f"model.heads={cfg.heads} ({where} attention heads) is not divisible by "
                          f"parallel.tp={tp}; set parallel.tp to one of {valid}")
    if cfg.width % tp:
        raise ConfigError(f"model.width={cfg.width} is not divisible by parallel.tp={tp}; set "
                          f"parallel.tp to one of {valid}")
    if cfg.mlp_dim % tp:
        raise ConfigError(f"model.mlp_dim={cfg.mlp_dim} is not divisible by parallel.tp={tp}; set "
                          f"parallel.tp to one of {valid}")
    if cfg.pool == "map" and (cfg.map_mlp_dim or cfg.mlp_dim) % tp:
        raise ConfigError(f"model.map_mlp_dim={cfg.map_mlp_dim} (the MAP head's MLP) is not "
                          f"divisible by parallel.tp={tp}; set parallel.tp to one of {valid}")
    if tp > 1 and dp_shard > 1 and cfg.width % dp_shard:
        raise ConfigError(f"model.width={cfg.width} is not divisible by parallel.dp_shard="
                          f"{dp_shard}: with tensor parallelism FSDP shards the fused qkv weights "
                          "by their input features; pick a dp_shard that divides the width")
    n = num_tokens(model)
    if sequence_parallel and n % tp:
        if cfg.class_token:
            why = (f"a class token makes {n} tokens ({cfg.num_patches} patches + 1); use "
                   "model.pool=gap or map without a class token (Scaling ViT) or set "
                   "parallel.sequence_parallel=false")
        else:
            why = (f"{n} patches of {cfg.patch[0]}x{cfg.patch[1]} at img_size "
                   f"{cfg.img_size[0]}x{cfg.img_size[1]}; pick an img_size whose patch count "
                   "divides by parallel.tp or set parallel.sequence_parallel=false")
        raise ConfigError(f"parallel.sequence_parallel=true splits the tokens over "
                          f"parallel.tp={tp} ranks, but {why}")


# ---------------------------------------------------------------------------------- styles
# The public styles (ColwiseParallel, RowwiseParallel, SequenceParallel, PrepareModuleInput /
# Output) cover the plan but for two layouts; the two ParallelStyle subclasses below implement
# them with the public `distribute_module` (ParallelStyle's contract is its `_apply` method).


def _as_dtensor(x: Any, mesh: DeviceMesh, layout: Placement, desired: Placement | None = None):
    """A module input as a DTensor: a plain tensor is annotated with `layout`, a DTensor is
    taken as it is; then redistributed to `desired` when given."""
    if not isinstance(x, torch.Tensor):
        return x
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, (layout,), run_check=False)
    if desired is not None and tuple(x.placements) != (desired,):
        x = x.redistribute(mesh, (desired,))
    return x


class _Replicated(ParallelStyle):
    """Replicated parameters and buffers (Replicate() DTensors with rank 0's values); the input
    annotated as `input_layout` and redistributed to `desired` (both Replicate by default: the
    module computes on every rank, with no communication); the output a plain local tensor when
    `local_output`, else left a DTensor."""

    def __init__(self, *, input_layout: Placement | None = None,
                 desired: Placement | None = None, local_output: bool = True) -> None:
        self.input_layout = input_layout or Replicate()
        self.desired = desired or Replicate()
        self.local_output = local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return tuple(_as_dtensor(x, mesh, self.input_layout, self.desired) for x in inputs)

        def output_fn(mod, outputs, mesh):
            return outputs.to_local() if self.local_output else outputs

        # partition_fn None: every parameter and buffer becomes a Replicate() DTensor.
        return distribute_module(module, device_mesh, None, input_fn, output_fn)


class _FusedColwise(ParallelStyle):
    """Column-wise Linear whose output features are `chunks` stacked groups (qkv: 3, kv: 2),
    each laid out (heads, head_dim): the weight `_StridedShard(0, split_factor=chunks)`, so a
    rank holds its heads' rows of every group, contiguous in its local tensor; the bias
    replicated (DTensor adds each rank's slice, no communication). The input
    (annotated `input_layout`) is redistributed to Replicate; the output is the local tensor
    (batch, tokens, chunks * width / tp), which reshapes to (..., chunks, heads / tp, head_dim).

    `_StridedShard` is a private placement, used because DTensor has no public one for "dim 0
    sharded within each of `chunks` blocks" (it exists for FSDP2 x TP); the alternatives change
    the parameter's name (separate q, k, v) or its values (rows permuted per rank)."""

    def __init__(self, chunks: int, *, input_layout: Placement | None = None) -> None:
        self.chunks = chunks
        self.input_layout = input_layout or Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear) or module.out_features % self.chunks:
            raise TypeError(f"expected a Linear with {self.chunks} stacked output groups, got "
                            f"{module}")
        chunks = self.chunks

        def partition_fn(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                # The bias stays replicated: FSDP2 could only shard a 1-D strided tensor on
                # dim 0, and would get the layout wrong (see fsdp_shard_placement).
                layout = _StridedShard(0, split_factor=chunks) if pname == "weight" else Replicate()
                dist = distribute_tensor(param, mesh, [layout])
                mod.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))

        def input_fn(mod, inputs, mesh):
            return (_as_dtensor(inputs[0], mesh, self.input_layout, Replicate()),) + inputs[1:]

        def output_fn(mod, outputs, mesh):
            return outputs.to_local()

        return distribute_module(module, device_mesh, partition_fn, input_fn, output_fn)


# ---------------------------------------------------------------------------------- the plan
def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> None:
    """Shard `model` (a vitscale VisionTransformer, built plain, on any device or meta) in place
    over the 1-D mesh `tp_mesh`. Call before FSDP2's fully_shard (on the dp sub-mesh of the same
    mesh), activation checkpointing and compile."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D mesh (e.g. mesh['tp']), got {tp_mesh.ndim} dims")
    check_tp(model, tp_mesh.size(), sequence_parallel)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError("the model's parameters are already DTensors; apply_tp takes a plain "
                          "model and runs once, before FSDP")
    from vitscale.models.layers import Block, MAPHead, ParallelBlock

    mesh, sp = tp_mesh, sequence_parallel
    seq = Shard(1)

    def plan(module: nn.Module, style) -> None:
        parallelize_module(module, mesh, style)

    def replicate_param(module: nn.Module, name: str) -> None:
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter):
            dist = distribute_tensor(param, mesh, [Replicate()])
            module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))

    def attention(attn: nn.Module, qkv_input, out_layout) -> None:
        plan(attn.qkv, _FusedColwise(3, input_layout=qkv_input))
        for norm in (attn.q_norm, attn.k_norm):
            if not isinstance(norm, nn.Identity):
                # Per head: the input is this rank's heads, (B, heads / tp, N, head_dim).
                plan(norm, _Replicated(input_layout=Shard(1), desired=Shard(1)))
        plan(attn.proj, RowwiseParallel(output_layouts=out_layout))

    # Stem: computed on every rank as DTensors (the class token and position embedding are
    # parameters of the root, used in VisionTransformer._pos_embed), plain again at pos_drop.
    plan(model.patch_embed, _Replicated(local_output=False))
    model.patch_embed.register_forward_pre_hook(partial(_check_input_size, model.cfg),
                                                prepend=True)
    replicate_param(model, "cls_token")
    replicate_param(model, "dist_token")
    replicate_param(model, "pos_embed")
    fixed = getattr(model, "pos_embed_fixed", None)
    if fixed is not None:
        model.register_buffer("pos_embed_fixed", distribute_tensor(fixed, mesh, [Replicate()]),
                              persistent=False)
    plan(model.pos_drop, PrepareModuleInput(input_layouts=Replicate(),
                                            desired_input_layouts=Replicate(),
                                            use_local_output=True))
    if sp:
        plan(model.blocks[0], PrepareModuleInput(input_layouts=Replicate(),
                                                 desired_input_layouts=seq,
                                                 use_local_output=True))

    for block in model.blocks:
        if isinstance(block, ParallelBlock):
            # y = norm1(x) is read by attn and mlp: one DTensor (all-gathered once under SP),
            # whose two partial input gradients add up before one reduction.
            if sp:
                plan(block.norm1, SequenceParallel(use_local_output=False))
                plan(block.norm1, PrepareModuleOutput(output_layouts=seq,
                                                      desired_output_layouts=Replicate(),
                                                      use_local_output=False))
            else:
                plan(block.norm1, _Replicated(local_output=False))
            attention(block.attn, Replicate(), Partial())
            plan(block.mlp.fc1, ColwiseParallel())
            plan(block.mlp.fc2, RowwiseParallel(output_layouts=Partial()))
            # attn(y) + mlp(y), both partial sums, and drop-path (linear, the same mask on every
            # rank) reduced once: all-reduce, or reduce-scatter onto the sequence shards.
            plan(block.drop_path, PrepareModuleOutput(output_layouts=Partial(),
                                                      desired_output_layouts=seq if sp
                                                      else Replicate(),
                                                      use_local_output=True))
        elif isinstance(block, Block):
            for norm in (block.norm1, block.norm2):
                plan(norm, SequenceParallel() if sp else _Replicated())
            attention(block.attn, seq if sp else Replicate(), seq if sp else Replicate())
            plan(block.mlp.fc1, ColwiseParallel(input_layouts=seq if sp else Replicate()))
            plan(block.mlp.fc2, RowwiseParallel(output_layouts=seq if sp else Replicate()))
            block.fusable = False  # the fused CPU kernel cannot take DTensor weights
        else:
            raise ConfigError(f"tensor parallelism does not know the block {type(block).__name__}; "
                              "use parallel.dp_shard (FSDP) instead")

    # Final norm: on sequence shards under SP, then the tokens gathered for pooling.
    if isinstance(model.norm, nn.LayerNorm):
        if sp:
            plan(model.norm, SequenceParallel(use_local_output=False))
            plan(model.norm, PrepareModuleOutput(output_layouts=seq,
                                                 desired_output_layouts=Replicate(),
                                                 use_local_output=True))
        else:
            plan(model.norm, _Replicated())
    elif sp:
        plan(model.norm, PrepareModuleInput(input_layouts=seq, desired_input_layouts=Replicate(),
                                            use_local_output=True))
    if isinstance(model.fc_norm, nn.LayerNorm):
        plan(model.fc_norm, _Replicated())
    pool = model.attn_pool
    if isinstance(pool, MAPHead):
        replicate_param(pool, "latent")
        plan(pool.q, ColwiseParallel())  # its input, latent.expand(...), is a DTensor already
        plan(pool.kv, _FusedColwise(2))
        plan(pool.proj, RowwiseParallel())
        plan(pool.norm, _Replicated())
        plan(pool.mlp.fc1, ColwiseParallel())
        plan(pool.mlp.fc2, RowwiseParallel())
    for module in (getattr(model.pre_logits, "fc", None), model.head, model.head_dist):
        if isinstance(module, nn.Linear):
            plan(module, _Replicated())

    leftover = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if leftover:  # a model part this plan does not know: refuse rather than mix
        raise ConfigError(f"tensor parallelism does not cover the parameters {leftover[:4]}; use "
                          "parallel.dp_shard (FSDP) instead of parallel.tp")
    if not any(p.is_meta for p in model.parameters()):
        reduce_replicated_grads(model)  # on meta: after `to_empty` (init.materialize does)


def reduce_replicated_grads(model: nn.Module) -> None:
    """Give every replicated DTensor parameter a gradient hook that makes its gradient
    Replicate() too (see _reduce_partial_grad). Not before `to_empty`: it swaps each DTensor's
    storage and Python attributes, which leaves a hook registered earlier listed but no longer
    called, and a later registration into that list is not called either (measured)."""
    for param in model.parameters():
        if param.requires_grad and isinstance(param, DTensor) \
                and all(p.is_replicate() for p in param.placements):
            param.register_hook(partial(_reduce_partial_grad, tuple(param.placements)))


def _reduce_partial_grad(placements, grad):
    """A replicated parameter used on sharded activations gets a partial-sum (QK-norm, SP norms:
    one all-reduce) or sharded (the fused bias: one all-gather) gradient: make it Replicate()
    like the parameter; unchanged when it already is."""
    if tuple(grad.placements) != placements:
        grad = grad.redistribute(grad.device_mesh, placements)
    return grad


def _check_input_size(cfg, module, inputs):
    x = inputs[0]
    if tuple(x.shape[-2:]) != tuple(cfg.img_size):
        h, w = cfg.img_size
        raise ConfigError(f"a tensor-parallel model takes images of its built size {h}x{w} only, "
                          f"got {x.shape[-2]}x{x.shape[-1]}; resize the input, or evaluate an "
                          "unsharded copy (models.load) at other sizes")


# ---------------------------------------------------------------------------------- FSDP2, checkpoints
def fsdp_shard_placement(param: nn.Parameter) -> Shard | None:
    """FSDP2's `shard_placement_fn` for a tensor-parallel model: `Shard(1)` for the fused qkv /
    kv weights, None (FSDP's default `Shard(0)`) for everything else. Pass it to every
    `fully_shard` call: FSDP2 describes its dim-0 shards of a TP parameter as if TP's were
    contiguous (`_StridedShard(0, split_factor=tp)`), which for a `_StridedShard(0,
    split_factor=3)` TP layout is the wrong rows: the training arithmetic would still be
    right (FSDP gathers local tensors), but full_tensor(), checkpoints and the state dict not.
    Sharding the input dim instead is orthogonal to TP's. `check_fsdp_layout` verifies it."""
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) and p.dim == 0
                                          for p in param.placements):
        return Shard(1)
    return None


def check_fsdp_layout(model: nn.Module) -> None:
    """Raise when FSDP2 sharded a fused qkv / kv weight on dim 0 on top of TP's strided dim-0
    layout (fully_shard without `shard_placement_fn=fsdp_shard_placement`)."""
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor) or param.device_mesh.ndim < 2:
            continue
        *outer, tp = param.placements  # FSDP2 puts its dims before the TP mesh's
        if isinstance(tp, _StridedShard) and tp.dim == 0 and any(
                isinstance(p, (Shard, _StridedShard)) and p.dim == 0 for p in outer):
            raise ConfigError(f"{name}: FSDP2 sharded dim 0 of a tensor-parallel fused weight "
                              f"({param.placements}); pass shard_placement_fn="
                              "vitscale.parallel.tp.fsdp_shard_placement to fully_shard")


def dcp_layout(tensor: Any) -> Any:
    """`tensor` in a layout torch.distributed.checkpoint can store: a DTensor whose TP placement
    (the last: FSDP2 puts its own first) is this plan's `_StridedShard` (the fused qkv / kv
    weights and their optimizer states) redistributed to the contiguous `Shard` of that dim;
    anything else returned as it is (FSDP2's own `_StridedShard` over a TP `Shard` is one chunk
    per rank, which DCP stores). Same values (full_tensor()); a collective when it
    redistributes: every rank calls it on the same tensors, as DCP needs anyway."""
    if not isinstance(tensor, DTensor) or not isinstance(tensor.placements[-1], _StridedShard):
        return tensor
    *outer, tp = tensor.placements
    return tensor.redistribute(tensor.device_mesh, (*outer, Shard(tp.dim)))


def load_full_state(model: nn.Module, full: dict[str, torch.Tensor] | None, src: int = 0) -> None:
    """Fill the parameters and buffers of a sharded `model` (apply_tp, with or without FSDP2 on
    top; e.g. built on meta, then `to_empty`) from `full`, {name: the plain model's tensor} for
    every name of `named_parameters()` and `named_buffers()` (non-persistent ones included), on
    global rank `src` (None elsewhere), tensor by tensor: a broadcast, then every rank keeps its
    own shard as `distribute_tensor` splits it, which knows `_StridedShard`.

    `set_model_state_dict(..., broadcast_from_rank0=True)` cannot be used for this model: it
    slices one contiguous chunk per rank (compute_local_shape_and_global_offset), which for the
    fused qkv / kv is the wrong rows, silently. (`full_state_dict=True` with the full dict on
    every rank goes through distribute_tensor and is right.)"""
    import torch.distributed as dist

    rank = dist.get_rank()
    named = list(model.named_parameters()) + list(model.named_buffers())
    # Every rank learns what rank src lacks, so that all of them raise (none waits in a broadcast).
    missing = [[n for n, _ in named if n not in full] if rank == src else None]
    dist.broadcast_object_list(missing, src=src)
    if missing[0]:
        raise ConfigError(f"load_full_state: the full weights lack {missing[0][:4]}; pass every "
                          "parameter and buffer (dict(m.named_parameters()) | dict(m.named_buffers()))")
    for name, tensor in named:
        shape = tensor.shape
        if rank == src:
            value = full[name].detach().to(tensor.device, tensor.dtype).contiguous()
            if value.shape != shape:
                raise ConfigError(f"{name}: shape {tuple(value.shape)} does not fit the model's "
                                  f"{tuple(shape)}")
        else:
            value = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        dist.broadcast(value, src=src)
        with torch.no_grad():
            if isinstance(tensor, DTensor):
                local = distribute_tensor(value, tensor.device_mesh, tensor.placements,
                                          src_data_rank=None)  # no communication: a slice
                tensor.to_local().copy_(local.to_local())
            else:
                tensor.copy_(value)


def restore_layout(live: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy `loaded` (what DCP filled in place of `dcp_layout(live)`) into `live`, in live's
    layout; nothing to do when they are the same tensor."""
    if loaded is live:
        return
    if isinstance(live, DTensor) and isinstance(loaded, DTensor):
        loaded = loaded.redistribute(live.device_mesh, live.placements)
    with torch.no_grad():
        live.copy_(loaded)
