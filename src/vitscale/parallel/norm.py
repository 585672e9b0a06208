"""The global gradient norm of a sharded model and clipping by it, in one all-reduce.

Each process sums the squares of its local gradient shards; a DTensor whose placements shard it
over mesh dims of total size S exists in world/S copies (replicated over the other processes),
so its sum is weighted by S/world; a plain tensor is the same in every process (weight 1/world).
The weighted sums are added over all processes: the squared norm of the whole gradient, the
same number in every process (so every process skips a non-finite step together)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _local_and_copies(grad: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor):
        return grad, world
    from torch.distributed.tensor.placement_types import _StridedShard

    # A tensor-parallel fused weight's per-head layout (_StridedShard) is a shard too, although
    # its is_shard() says no.
    shards = math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements)
                       if p.is_shard() or isinstance(p, _StridedShard))
    return grad.to_local(), world // shards


def clip_grad_norm(parameters, max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients of `parameters` (a 0-d fp32 tensor on their device);
    with `max_norm`, gradients are scaled by min(1, max_norm / (norm + 1e-6)) as
    torch.nn.utils.clip_grad_norm_ does."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    grads = [p.grad for p in parameters if p.grad is not None]
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        local, copies = _local_and_copies(g, world)
        by_copies.setdefault(copies, []).append(local)
    device = next(iter(by_copies.values()))[0].device if by_copies else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, locals_ in by_copies.items():
        norms = torch._foreach_norm([t.float() for t in locals_])
        total += torch.stack(norms).square().sum() / copies
    if world > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm is not None:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        locals_ = [t for ts in by_copies.values() for t in ts]
        torch._foreach_mul_(locals_, scale.to(locals_[0].dtype) if locals_ else scale)
    return norm
