"""Meta-device construction. With sharding, every process builds the model on the `meta` device
(no memory), shards it, then allocates only its local shards (`to_empty`). The values come from
one process: rank 0 builds the model on the CPU exactly as a one-process run does (same seed,
same `model.init` checkpoint) and its full state is broadcast tensor by tensor, each process
keeping its own shard (torchtitan's "seed checkpoint", without the file). So the initial weights
equal the one-process run's for any mesh. Cost: rank 0 needs host memory for the full fp32
model once (22B: 87 GB); the other processes and every accelerator hold shards only."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every parameter and buffer on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return build()


def materialize(model: nn.Module, device: torch.device, source: nn.Module | None) -> None:
    """Allocate the local shards of a sharded meta `model` on `device` and fill them from
    `source`, the whole model on rank 0 (None elsewhere): every parameter and buffer (the
    non-persistent ones too, e.g. fixed sin-cos position embeddings) broadcast in turn, each
    process keeping its own shard (`tp.load_full_state`, which knows the per-head layout of
    tensor-parallel fused weights)."""
    from vitscale.parallel.tp import load_full_state, reduce_replicated_grads

    model.to_empty(device=device)
    reduce_replicated_grads(model)  # to_empty replaced the parameters, and their hooks
    full = None
    if source is not None:
        full = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    load_full_state(model, full)
