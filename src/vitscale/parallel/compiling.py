"""torch.compile per block: the blocks of a model repeat, so they share one compiled graph
(compiling the whole model would trace every block). `Module.compile` compiles in place, so
parameter names stay the model's (no `_orig_mod.` prefix in checkpoints)."""

from __future__ import annotations

import torch.nn as nn


def compile_blocks(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.compile()
