"""The repeated transformer blocks of a model: the units that are checkpointed, compiled and
sharded one by one."""

from __future__ import annotations

import torch.nn as nn

from vitscale.models.asvit import AsViTBlock
from vitscale.models.layers import Block, ParallelBlock

BLOCK_TYPES = (Block, ParallelBlock, AsViTBlock)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of `model` in forward order (a ViT's `blocks`, an As-ViT's stages in turn)."""
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
