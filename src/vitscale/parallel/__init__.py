"""Scale-out, applied to a plain model from outside (the model files know nothing of it), in
torchtitan's order: tensor parallelism, then activation checkpointing, then per-block
torch.compile, then FSDP2 per block and on the root.

    layout = Layout(dp_replicate, dp_shard, tp); mesh = build_mesh(layout, device)
    model = build_on_meta(lambda: build(cfg))    # nothing allocated
    parallelize(model, mesh, layout, cfg.parallel)
    materialize(model, device, full_model_on_rank0)

`Trainer` does exactly this; `mesh` is None for a single process or plain DDP, where only
checkpointing and compile apply.
"""

from __future__ import annotations

import torch.nn as nn

from vitscale.parallel.blocks import transformer_blocks
from vitscale.parallel.checkpointing import apply_activation_checkpointing
from vitscale.parallel.compiling import compile_blocks
from vitscale.parallel.fsdp import apply_fsdp, reshard
from vitscale.parallel.init import build_on_meta, materialize
from vitscale.parallel.mesh import MESH_DIMS, Layout, build_mesh, fsdp_mesh
from vitscale.parallel.norm import clip_grad_norm

__all__ = ["MESH_DIMS", "Layout", "build_mesh", "build_on_meta", "clip_grad_norm", "materialize",
           "parallelize", "reshard", "transformer_blocks"]


def parallelize(model: nn.Module, mesh, layout: Layout, cfg, train: bool = True) -> None:
    """Apply `cfg` (a config.ParallelConfig) to `model` in place. `train=False` (an EMA copy,
    only evaluated) skips activation checkpointing and compile."""
    blocks = transformer_blocks(model)
    if layout.tp > 1:
        from vitscale.parallel.tp import apply_tp, check_tp

        check_tp(model, layout.tp, cfg.sequence_parallel, dp_shard=layout.dp_shard)
        apply_tp(model, mesh["tp"], cfg.sequence_parallel)
    if train:
        apply_activation_checkpointing(blocks, cfg.checkpoint_every())
        if cfg.compile:
            compile_blocks(blocks)
    if mesh is not None and layout.sharded:
        dp = fsdp_mesh(mesh, layout)
        if dp is not None:
            apply_fsdp(model, blocks, dp, cfg.param_dtype, cfg.reduce_dtype,
                       tensor_parallel=layout.tp > 1)
