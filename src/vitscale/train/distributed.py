"""Training under `torchrun`: one process per device, the same code path as a single process
(world size 1, where every helper here is a no-op). Sharding and tensor parallelism
(`parallel.*` settings) are vitscale.parallel's; this module is the process group itself.

    torchrun --standalone --nproc_per_node 8 -m vitscale.cli train --config configs/X.yaml

Each process takes its contiguous slice of every global batch (data.batch_size is the global
batch), DistributedDataParallel averages the gradients, and rank 0 alone writes metrics,
checkpoints and the final weights. Evaluation splits every split across the processes and sums
the counts. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vitscale.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This process's contiguous slice of `n` items (n divisible by the world size)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


SINGLE = World()  # one process, no process group


def world_from_env() -> World:
    """The process's place as torchrun's environment variables tell it (1 process without)."""
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> bool:
    """Join the process group when running under torchrun; True when this call created it."""
    if not world.distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def device_for(world: World, device: torch.device) -> torch.device:
    """One CUDA device per local process."""
    if device.type == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"process {world.local_rank} of this node has no CUDA device of its own "
                            f"({torch.cuda.device_count()} visible); start at most that many "
                            f"processes per node (torchrun --nproc_per_node) or train with device=cpu")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def all_sum(values: list[float | torch.Tensor], world: World, device: torch.device) -> list[float]:
    """Element-wise sum over processes (float64, so counts stay exact); values may be 0-d
    tensors on `device` (one host synchronisation for all of them)."""
    t = torch.stack([torch.as_tensor(v, device=device).double().reshape(()) for v in values])
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every process's `obj`, in rank order (a one-item list in a single process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` in every process (pickled over the process group: trusted, in-run data)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()
