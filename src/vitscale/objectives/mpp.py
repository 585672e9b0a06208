"""Masked patch prediction, as the ViT paper's self-supervision describes it (`objective: mpp`).

Per image, `corrupt_rate` of the patch embeddings (exactly round(rate x N) of its N patches, at least one) are
selected. Each selected one is, independently: replaced by a learned [mask] embedding
(`mask_fraction`, 80%), replaced by the embedding of another patch of the same image
(`random_fraction`, 10%; never the patch itself), or left as it is (the rest, 10%). This happens
in embedding space, before position embeddings are added, so a corrupted token keeps its place.
A linear head on each selected patch's output token predicts its target:

    mean3bit        the patch's mean colour, 3 bits per channel: one 512-way class (the paper's)
    patch4x4_3bit   the patch area-downsized to 4 x 4, each cell's colour a 512-way class (16 outputs)
    l2              the patch's pixels (the input's [-1, 1] values), mean squared error

Colours are the un-normalised [0, 255] pixels bucketed into 8 levels per channel (floor(v / 32)).
The training metrics are the loss and the accuracy over the selected patches' targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.config import MPPConfig
from vitscale.errors import ConfigError
from vitscale.objectives.pretrain import (
    PretrainObjective,
    check_patch_encoder,
    color_classes,
    patchify,
)

UNCHANGED, MASKED, SWAPPED, KEPT = 0, 1, 2, 3  # a patch's fate; KEPT: selected but not altered


def corruption_plan(batch: int, patches: int, cfg: MPPConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, N, 2) long: each patch's fate (UNCHANGED / MASKED / SWAPPED / KEPT) and, for a swapped
    one, the index of the other patch of its image whose embedding replaces it."""
    selected = min(max(int(round(cfg.corrupt_rate * patches)), 1), patches)
    order = torch.rand(batch, patches, generator=gen).argsort(dim=1)
    is_selected = torch.zeros(batch, patches, dtype=torch.bool)
    is_selected.scatter_(1, order[:, :selected], True)
    u = torch.rand(batch, patches, generator=gen)
    fate = torch.full((batch, patches), UNCHANGED, dtype=torch.long)
    fate[is_selected & (u < cfg.mask_fraction)] = MASKED
    swap = is_selected & (u >= cfg.mask_fraction) & (u < cfg.mask_fraction + cfg.random_fraction)
    fate[swap] = SWAPPED
    fate[is_selected & (fate == UNCHANGED)] = KEPT
    # Another patch: an offset in 1..N-1 from this one, modulo N.
    offset = torch.randint(1, max(patches, 2), (batch, patches), generator=gen)
    source = (torch.arange(patches).unsqueeze(0) + offset) % patches
    source = torch.where(swap, source, torch.arange(patches).expand(batch, -1))
    return torch.stack([fate, source], dim=-1)


def corrupt(embeddings: torch.Tensor, plan: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """The (B, N, D) patch embeddings with the plan's masked and swapped patches replaced."""
    fate, source = plan[..., 0], plan[..., 1]
    others = torch.gather(embeddings, 1, source.unsqueeze(-1).expand_as(embeddings))
    out = torch.where((fate == SWAPPED).unsqueeze(-1), others, embeddings)
    return torch.where((fate == MASKED).unsqueeze(-1), mask_token.to(out.dtype), out)


class MPPHead(nn.Module):
    """What MPP trains beside the encoder: the [mask] embedding and the prediction head."""

    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(width, outputs)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)


class MaskedPatchPrediction(PretrainObjective):
    name = "mpp"

    def __init__(self, cfg: MPPConfig, model: nn.Module, **masks) -> None:
        super().__init__(**masks)  # seed, batch_size, shard, rank: see PretrainObjective
        check_patch_encoder(model, "mpp")
        mcfg = model.cfg
        self.cfg = cfg
        self.patch = tuple(mcfg.patch)
        self.channels = mcfg.in_chans
        self.num_patches = mcfg.grid_size[0] * mcfg.grid_size[1]
        self.prefix = model.num_prefix_tokens
        self.levels = 8 ** self.channels  # 512 colours for RGB
        if cfg.target == "patch4x4_3bit" and min(self.patch) < 4:
            raise ConfigError(f"mpp.target=patch4x4_3bit downsizes each patch to 4x4 pixels, but "
                              f"the patches are {self.patch[0]}x{self.patch[1]}; use patches of 4 "
                              "px or more, or mpp.target=mean3bit")
        if cfg.target == "mean3bit":
            self.cells, outputs = 1, self.levels
        elif cfg.target == "patch4x4_3bit":
            self.cells, outputs = 16, 16 * self.levels
        else:
            self.cells, outputs = 0, self.patch[0] * self.patch[1] * self.channels
        self.module = MPPHead(mcfg.width, outputs)

    def trainable(self) -> nn.Module:
        return self.module

    def draw(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return corruption_plan(batch, self.num_patches, self.cfg, gen)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, cells) colour classes, or (B, N, ph * pw * C) pixels for l2."""
        if self.cells:
            return color_classes(images, self.patch, int(self.cells ** 0.5))
        return patchify(images.float(), self.patch)

    def batch_loss(self, model, images, plan):
        mask_token = self.module.mask_token
        tokens = model(images, outputs="tokens", patch_hook=lambda e: corrupt(e, plan, mask_token))
        selected = plan[..., 0] != UNCHANGED  # (B, N)
        out = self.module.head(tokens[:, self.prefix:][selected]).float()  # (M, outputs)
        target = self.targets(images)[selected]
        if not self.cells:
            return F.mse_loss(out, target), None, 0
        logits = out.reshape(-1, self.cells, self.levels)
        loss = F.cross_entropy(logits.reshape(-1, self.levels), target.reshape(-1))
        correct = (logits.argmax(-1) == target).sum()
        return loss, correct, target.numel()
