"""Activation checkpointing: a block keeps only its input in forward and recomputes the rest in
backward (torch.utils.checkpoint, non-reentrant; the RNG state is replayed, so dropout and
drop-path draw the same masks twice).

The block's `forward` is wrapped in place rather than the block put inside a wrapper module, so
parameter names (checkpoints, `optim.lr_mults`, the optimizer's per-head views) do not change.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.vitscale_checkpointed = True
    return run


def apply_activation_checkpointing(blocks: list[nn.Module], every: int) -> int:
    """Checkpoint every `every`-th block (the every-th, 2 x every-th, ...; 1: all of them, 0:
    none). Returns how many blocks are checkpointed."""
    if every < 1:
        return 0
    chosen = [block for i, block in enumerate(blocks) if (i + 1) % every == 0]
    for block in chosen:
        if not getattr(block.forward, "vitscale_checkpointed", False):
            block.forward = _recomputed(block.forward)
    return len(chosen)
