"""The process mesh: dp_replicate x dp_shard x tp, in that order (the tensor-parallel ranks of a
group are neighbours, so on a multi-GPU node their collectives stay on the fast links)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """How many processes replicate, shard and tensor-split the model."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def sharded(self) -> bool:
        """Parameters live as DTensor shards (FSDP2 and / or TP), not whole in every process."""
        return self.dp_shard > 1 or self.tp > 1

    @property
    def replicas(self) -> int:
        """Data-parallel ranks: the processes of one TP group work on the same examples."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def __str__(self) -> str:
        return f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp}"


def build_mesh(layout: Layout, device: torch.device):
    """A 3-D DeviceMesh named MESH_DIMS over every process (the process group must exist)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh, layout: Layout):
    """The sub-mesh FSDP2 shards over: (dp_replicate, dp_shard) for HSDP, dp_shard alone
    otherwise; None when there is no data-parallel dimension to shard or replicate over."""
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    if layout.dp_shard > 1:
        return mesh["dp_shard"]
    return None
