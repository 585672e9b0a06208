"""The Vision Transformer: patch (or hybrid) embedding, encoder, token / GAP / MAP heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vitscale.errors import ConfigError
from vitscale.models.config import ModelConfig
from vitscale.models.layers import Block, MAPHead, ParallelBlock, layer_norm
from vitscale.models.posemb import resample_grid, sincos_2d


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch = cfg.patch
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return (h // self.patch[0], w // self.patch[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Every ViT variant of ViT, AugReg, Scaling ViT and ViT-22B, chosen by `ModelConfig`.

    `forward` returns logits; `forward_features` the normalised tokens (B, prefix + N, D);
    `forward_pooled` the pre-logits representation (B, D or head_hidden). With a DeiT
    distillation token (`dist_token`), the logits are the mean of the class and distillation
    heads' and `forward(x, outputs="heads")` gives the two apart.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        if cfg.stem == "hybrid":
            from vitscale.models.hybrid import HybridEmbed

            self.patch_embed: nn.Module = HybridEmbed(cfg)
        else:
            self.patch_embed = PatchEmbed(cfg)
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.dist_token else None

        self.posemb_has_cls = cfg.posemb == "learn" and cfg.class_token and cfg.posemb_include_cls
        if cfg.posemb == "learn":
            rows = cfg.num_patches + cfg.posemb_prefix_rows
            self.pos_embed: nn.Parameter | None = nn.Parameter(torch.zeros(1, rows, d))
        else:
            self.pos_embed = None
        if cfg.posemb == "sincos2d":
            # Fixed, so not part of the state dict; positions in posemb_ref_grid units when set.
            fixed = sincos_2d(cfg.grid_size, d, ref_grid=cfg.posemb_ref_grid).unsqueeze(0)
            self.register_buffer("pos_embed_fixed", fixed, persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)

        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        block_cls = ParallelBlock if cfg.block == "parallel" else Block
        self.blocks = nn.Sequential(*[block_cls(cfg, rate) for rate in rates])
        self.set_windows(cfg.window_size, cfg.global_blocks)

        # timm names the final LayerNorm `norm` when it acts on tokens and `fc_norm` when it acts
        # on the pooled vector; keep both names so either kind of checkpoint loads as is.
        pooled_norm = cfg.pool == "gap" and cfg.gap_norm == "pooled"
        self.norm = nn.Identity() if pooled_norm else layer_norm(d, cfg.norm_eps, cfg.norm_bias)
        self.fc_norm = layer_norm(d, cfg.norm_eps, cfg.norm_bias) if pooled_norm else nn.Identity()
        self.attn_pool = MAPHead(cfg) if cfg.pool == "map" else None

        feat = d
        if cfg.head_hidden:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(d, cfg.head_hidden))
            self.pre_logits.add_module("act", nn.Tanh())
            feat = cfg.head_hidden
        else:
            self.pre_logits = nn.Identity()
        self.num_features = feat
        self.head = nn.Linear(feat, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(feat, cfg.num_classes) if cfg.dist_token else None
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """big_vision initialisation: xavier-uniform dense kernels, lecun-normal patch conv,
        N(0, 1e-6) MLP biases, N(0, posemb_init_std) learned posemb (or its sin-cos start),
        zero class token."""
        cfg = self.cfg
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if ".mlp.fc" in f".{name}":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        if self.pos_embed is not None and cfg.posemb_init == "sincos2d":
            prefix = cfg.posemb_prefix_rows
            nn.init.zeros_(self.pos_embed[:, :prefix])
            self.pos_embed[:, prefix:] = sincos_2d(cfg.grid_size, cfg.width)
        elif self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=cfg.posemb_init_std)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.dist_token is not None:  # DeiT's start; a zero token would copy the class token
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                if cfg.head_zero_init:
                    nn.init.zeros_(head.weight)
                nn.init.constant_(head.bias, cfg.head_bias_init)
        if hasattr(self.patch_embed, "init_weights"):
            self.patch_embed.init_weights()

    def reset_head(self, num_classes: int, zero_init: bool = True, bias_init: float = 0.0) -> None:
        """A new classifier for `num_classes` (fine-tuning): zero-initialised by default."""
        if num_classes <= 0 and self.head_dist is not None:
            raise ConfigError("a model with a distillation token needs a classifier "
                              "(num_classes >= 1); set dist_token=false to drop its heads")
        self.cfg = self.cfg.replace(num_classes=num_classes)
        if num_classes <= 0:
            self.head = nn.Identity()
            return
        self.head = nn.Linear(self.num_features, num_classes)
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.num_features, num_classes)
        for head in (self.head, self.head_dist):
            if head is None:
                continue
            if zero_init:
                nn.init.zeros_(head.weight)
            else:
                nn.init.xavier_uniform_(head.weight)
            nn.init.constant_(head.bias, bias_init)

    def set_windows(self, window_size: int, global_blocks=()) -> None:
        """Window attention (ViTDet) in every block but `global_blocks`; window_size=0: global
        everywhere. Attention has no parameters of its own to change, so trained weights stay."""
        self.cfg = self.cfg.replace(window_size=int(window_size), global_blocks=tuple(global_blocks))
        for i, block in enumerate(self.blocks):
            block.window = self.cfg.window_size if self.cfg.windowed(i) else 0
            block.num_prefix = self.num_prefix_tokens
            block.grid = self.cfg.grid_size

    # ------------------------------------------------------------------ forward
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        cfg = self.cfg
        if cfg.posemb == "sincos2d":
            pe = self.pos_embed_fixed
            if tuple(grid) != cfg.grid_size:
                # Keep the built grid's geometry, as a resampled table does; big_vision's integer
                # positions on the input's own grid with posemb_input_grid.
                ref = None if cfg.posemb_input_grid else cfg.posemb_ref_grid or cfg.grid_size
                pe = sincos_2d(grid, cfg.width, ref_grid=ref).unsqueeze(0).to(x.device)
            x = x + pe.to(x.dtype)
        elif cfg.posemb == "learn":
            pe = self.pos_embed
            prefix = cfg.posemb_prefix_rows
            if tuple(grid) != cfg.grid_size:
                if not cfg.dynamic_img_size:
                    raise ConfigError(
                        f"input gives a {grid[0]}x{grid[1]} patch grid but the model was built for "
                        f"{cfg.grid_size[0]}x{cfg.grid_size[1]}; resize the input, rebuild at the "
                        "new img_size (weights are resampled on load), or set dynamic_img_size=true"
                    )
                pe = resample_grid(pe, grid, cfg.grid_size, prefix, cfg.resample_mode,
                                   cfg.resample_antialias, cfg.resample_align_corners)
            if self.posemb_has_cls:
                return self._with_prefix(x) + pe
            x = x + pe
        return self._with_prefix(x)

    def _with_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The class (and distillation) token in front of the patch tokens."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token)
                  if t is not None]
        return torch.cat([*prefix, x], dim=1) if prefix else x

    def forward_features(self, x: torch.Tensor, patch_hook=None,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the encoder and its final LayerNorm: (B, prefix + N, D).

        For masked pre-training (vitscale.objectives): `patch_hook(patch_embeddings) ->
        patch_embeddings` edits the (B, N, D) patch embeddings before position embeddings are
        added (masked patch prediction); `keep` (B, K) indices of the patches the encoder sees,
        chosen after position embeddings are added (MAE): (B, prefix + K, D) out."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ConfigError(
                f"expected images of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}"
            )
        x = self.pad_input(x)
        grid = self._grid(x.shape[-2], x.shape[-1])
        if self.cfg.window_size:
            for block in self.blocks:
                block.grid = grid
        x = self.patch_embed(x)
        if patch_hook is not None:
            x = patch_hook(x)
        x = self._pos_embed(x, grid)
        if keep is not None:
            if self.cfg.window_size:
                raise ConfigError("keep= (a subset of the patches) needs global attention; window "
                                  "attention (window_size > 0) partitions the full patch grid")
            p = self.num_prefix_tokens
            index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = torch.cat([x[:, :p], torch.gather(x[:, p:], 1, index)], dim=1)
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """With dynamic_img_pad, images zero-padded at the bottom / right to a multiple of the
        patch; otherwise as they are."""
        ph, pw = self.cfg.patch
        bottom, right = (-x.shape[-2]) % ph, (-x.shape[-1]) % pw
        if self.cfg.dynamic_img_pad and (bottom or right):
            x = torch.nn.functional.pad(x, (0, right, 0, bottom))
        return x

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        ph, pw = self.cfg.patch
        if h % ph or w % pw:
            raise ConfigError(
                f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop "
                "the images to a multiple of the patch size, or set dynamic_img_pad=true"
            )
        return (h // ph, w // pw)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled representation before the pre-logits layer."""
        pool = self.cfg.pool
        if pool == "token":
            return tokens[:, 0]
        if pool == "gap":
            return self.fc_norm(tokens[:, self.num_prefix_tokens:].mean(dim=1))
        if pool == "map":
            return self.attn_pool(tokens)
        return tokens

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The representation few-shot and linear probes use (big_vision's `pre_logits`)."""
        return self.pre_logits(self.pool(self.forward_features(x)))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, x: torch.Tensor, outputs: str = "logits", patch_hook=None,
                keep: torch.Tensor | None = None):
        """`outputs`: "logits"; "pooled": (logits, the pre-logits representation); "heads": (the
        class head's logits, the distillation head's), for a model with a distillation token;
        "tokens": `forward_features` (with its `patch_hook` / `keep`), through this call so that
        DDP / FSDP wrappers see the forward pass."""
        if outputs not in ("logits", "pooled", "heads", "tokens"):
            raise ValueError(f"outputs={outputs!r}; use 'logits', 'pooled', 'heads' or 'tokens'")
        tokens = self.forward_features(x, patch_hook, keep)
        if outputs == "tokens":
            return tokens
        pooled = self.pre_logits(self.pool(tokens))
        logits = self.head(pooled)
        if outputs == "pooled":
            return logits, pooled
        if self.head_dist is None:
            if outputs == "heads":
                raise ConfigError("outputs='heads' needs a model with a distillation token "
                                  "(dist_token=true)")
            return logits
        dist = self.head_dist(tokens[:, 1])
        return (logits, dist) if outputs == "heads" else (logits + dist) / 2

    # ------------------------------------------------------------------ convenience
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
