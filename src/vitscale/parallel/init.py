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
import torch.distributed as dist
import torch.nn as nn


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every parameter and buffer on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return build()


def materialize(model: nn.Module, device: torch.device, source: nn.Module | None) -> None:
    """Allocate the local shards of a sharded meta `model` on `device` and fill them from
    `source`, the whole model on rank 0 (None elsewhere): parameters and persistent buffers
    through the distributed state-dict API, non-persistent buffers (e.g. fixed sin-cos position
    embeddings) by broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    own = dict(source.named_buffers()) if source is not None else {}
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        if source is not None:
            buffer.copy_(own[name])
        dist.broadcast(buffer, src=0)
