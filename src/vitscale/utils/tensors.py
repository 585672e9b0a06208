"""Plain tensors and DTensor shards alike: the one helper every package uses to reach the part
of a tensor this process holds."""

from __future__ import annotations

import sys
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor; without importing torch.distributed.tensor (no DTensor exists
    before it is imported), so a single-process run never loads it."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its storage: in-place updates reach the DTensor), else t."""
    return t.to_local() if is_dtensor(t) else t
