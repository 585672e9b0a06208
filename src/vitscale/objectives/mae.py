"""Masked autoencoding (He et al., "Masked Autoencoders Are Scalable Vision Learners";
`objective: mae`).

Per image, `mask_ratio` of the patches (exactly N - round((1 - ratio) x N), at least one kept and
one hidden) are hidden after position embeddings are added, and the encoder runs on the visible
ones only (plus its class token, if any): that is where MAE's speed comes from. A light decoder
(`decoder_width` / `decoder_depth` / `decoder_heads`, pre-LN blocks of the encoder's kind) maps
the encoded tokens to its width, puts a learned [mask] token at every hidden patch, adds fixed
2-D sin-cos position embeddings and predicts each patch's pixels. The loss is the mean squared
error on the hidden patches only, against each patch's pixels normalised by its own mean and
variance (`norm_pix_loss`, MAE's better target) or the input's [-1, 1] values.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitscale.config import MAEConfig
from vitscale.errors import ConfigError
from vitscale.models.layers import Block, layer_norm
from vitscale.models.posemb import sincos_2d
from vitscale.objectives.pretrain import PretrainObjective, check_patch_encoder, patchify


def mae_masks(batch: int, patches: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(B, N) long: each image's patch indices in a random order, the kept ones first (sorted),
    then the hidden ones (sorted); the number kept is `kept_count(patches, ratio)`."""
    keep = kept_count(patches, ratio)
    order = torch.rand(batch, patches, generator=gen).argsort(dim=1)
    return torch.cat([order[:, :keep].sort(dim=1).values, order[:, keep:].sort(dim=1).values], 1)


def kept_count(patches: int, ratio: float) -> int:
    return min(max(int(round((1 - ratio) * patches)), 1), patches - 1)


class MAEDecoder(nn.Module):
    """MAE's decoder: embed, [mask] tokens at the hidden patches, sin-cos positions, blocks,
    LayerNorm, a linear layer to each patch's pixels."""

    def __init__(self, cfg: MAEConfig, encoder_cfg, prefix: int) -> None:
        super().__init__()
        width = cfg.decoder_width
        if width % cfg.decoder_heads or width % 4:
            raise ConfigError(f"mae.decoder_width={width} must be divisible by mae.decoder_heads="
                              f"{cfg.decoder_heads} and by 4 (sin-cos positions); e.g. 512 and 16")
        block_cfg = encoder_cfg.replace(
            width=width, depth=cfg.decoder_depth, heads=cfg.decoder_heads, num_classes=0,
            mlp_dim=max(int(round(width * cfg.decoder_mlp_ratio)), 1), block="sequential",
            dropout=0.0, attn_dropout=0.0, drop_path=0.0, window_size=0, global_blocks=())
        self.prefix = prefix
        self.embed = nn.Linear(encoder_cfg.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        grid = encoder_cfg.grid_size
        positions = torch.cat([torch.zeros(prefix, width), sincos_2d(grid, width)]).unsqueeze(0)
        self.register_buffer("positions", positions, persistent=False)
        self.blocks = nn.Sequential(*[Block(block_cfg, 0.0) for _ in range(cfg.decoder_depth)])
        for block in self.blocks:
            block.window = 0
        self.norm = layer_norm(width, encoder_cfg.norm_eps, encoder_cfg.norm_bias)
        ph, pw = encoder_cfg.patch
        self.pred = nn.Linear(width, ph * pw * encoder_cfg.in_chans)
        for module in self.modules():  # MAE: xavier-uniform linear layers, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: torch.Tensor, order: torch.Tensor, keep: int) -> torch.Tensor:
        """Encoded (B, prefix + K, D) tokens and the masks' `order` -> (B, N, pixels) predictions."""
        x = self.embed(encoded)
        b, n, width = x.shape[0], order.shape[1], x.shape[-1]
        patches = self.mask_token.to(x.dtype).expand(b, n, width)
        index = order[:, :keep].unsqueeze(-1).expand(-1, -1, width)
        patches = patches.scatter(1, index, x[:, self.prefix:])
        x = torch.cat([x[:, :self.prefix], patches], dim=1) + self.positions.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.prefix:])


class MaskedAutoencoder(PretrainObjective):
    name = "mae"

    def __init__(self, cfg: MAEConfig, model: nn.Module, **masks) -> None:
        super().__init__(**masks)  # seed, batch_size, shard, rank: see PretrainObjective
        check_patch_encoder(model, "mae")
        mcfg = model.cfg
        if mcfg.window_size:
            raise ConfigError("objective=mae runs the encoder on a random subset of the patches, "
                              f"which window attention (window_size={mcfg.window_size}) cannot "
                              "partition; pre-train with window_size=0 (ViTDet adds windows when "
                              "fine-tuning)")
        self.cfg = cfg
        self.patch = tuple(mcfg.patch)
        self.num_patches = mcfg.grid_size[0] * mcfg.grid_size[1]
        if self.num_patches < 2:
            raise ConfigError(f"objective=mae needs at least 2 patches to hide some, but the model "
                              f"sees {self.num_patches}; use smaller patches or larger images")
        self.keep = kept_count(self.num_patches, cfg.mask_ratio)
        self.module = MAEDecoder(cfg, mcfg, model.num_prefix_tokens)

    def trainable(self) -> nn.Module:
        return self.module

    def draw(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return mae_masks(batch, self.num_patches, self.cfg.mask_ratio, gen)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        pixels = patchify(images.float(), self.patch)
        if self.cfg.norm_pix_loss:
            mean = pixels.mean(-1, keepdim=True)
            var = pixels.var(-1, keepdim=True)  # unbiased, as MAE computes it
            pixels = (pixels - mean) / (var + 1e-6).sqrt()
        return pixels

    def batch_loss(self, model, images, plan):
        keep = plan[:, :self.keep]
        encoded = model(images, outputs="tokens", keep=keep)
        pred = self.module(encoded, plan, self.keep).float()
        hidden = plan[:, self.keep:].unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        error = (torch.gather(pred, 1, hidden) - torch.gather(self.target(images), 1, hidden)) ** 2
        return error.mean(), None, 0
