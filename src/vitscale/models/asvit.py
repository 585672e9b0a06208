"""The As-ViT backbone (Chen et al. 2022, "Auto-scaling Vision Transformers without Training").

A four-stage pyramid ViT with overlapping tokens (shared/research/asvit-official-code.md, §3):

* tokenizer: one convolution, kernel K1, stride 4 (1/4 resolution), "SAME" zero padding, then
  LayerNorm. Its stride and dilation can change during training without changing the weights
  (progressive re-tokenization, `set_tokenizer`); every later module follows the token grid.
* stages 1-4 at widths C, 2C, 4C, 8C (capped at `max_width`, 1024 as the public code), each
  `depths[i]` pre-LN blocks: window multi-head attention, the grid cut into S_i x S_i windows
  (S = 1: global), heads H/8, H/4, H/2, H; MLP with expansion E_i and GELU.
* re-embedding between stages: K_i x K_i neighbourhoods at stride 2 (K_i > 2 overlaps), SAME
  padding, LayerNorm over the K_i^2 * C values, Linear to the next width without bias.
* head: LayerNorm, average pool over tokens, Linear + tanh (pre-logits), Linear classifier.

No position embedding: position comes from the overlapping convolutions, as in the public code,
so a different grid needs no resampling. Grids that do not divide into windows are padded, the
padding masked out of attention.

Topologies are written as the paper's strings: `K1,S1,E1[,L1]|...|K4,S4,E4[,L4]|H[,C]`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.errors import ConfigError
from vitscale.models.layers import DropPath, Mlp

# The search space of the paper / public code, decision -> choices.
SEARCH_SPACE: dict[str, tuple[int, ...]] = {
    "K1": (4, 5, 6, 7, 8), "K2": (2, 3, 4), "K3": (2, 3, 4), "K4": (2, 3, 4),
    "S1": (2, 4, 8), "S2": (1, 2, 4), "S3": (1, 2),
    "E1": (2, 3, 4, 5, 6), "E2": (2, 3, 4, 5, 6), "E3": (2, 3, 4, 5, 6), "E4": (2, 3, 4, 5, 6),
    "heads": (16, 32, 64),
}


@dataclass
class AsViTConfig:
    kernels: tuple[int, int, int, int] = (8, 4, 4, 4)  # K1 (tokenizer), K2..K4 (re-embeddings)
    splits: tuple[int, int, int, int] = (2, 1, 1, 1)  # attention windows per side, per stage
    expansions: tuple[int, int, int, int] = (3, 2, 4, 6)  # MLP ratio per stage
    depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    heads: int = 32  # of stage 4; stages 1-3 get heads/8, /4, /2
    width: int = 32  # C, the width of stage 1
    max_width: int = 1024
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    tokenizer_stride: int = 4
    tokenizer_dilation: int = 1
    drop_path: float = 0.0
    norm_eps: float = 1e-5  # torch's LayerNorm default, as the public code
    name: str = "asvit"

    def __post_init__(self) -> None:
        for key in ("kernels", "splits", "expansions", "depths"):
            value = tuple(int(v) for v in getattr(self, key))
            if len(value) != 4:
                raise ConfigError(f"asvit.{key} needs 4 values (one per stage), got {value}")
            setattr(self, key, value)
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(v) for v in self.img_size)
        self.validate()

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(min(self.max_width, self.width * 2**i) for i in range(4))

    @property
    def stage_heads(self) -> tuple[int, ...]:
        return tuple(max(self.heads // 2 ** (3 - i), 1) for i in range(4))

    def validate(self) -> None:
        if min(self.depths) < 1 or self.width < 1 or min(self.expansions) < 1 or min(self.splits) < 1:
            raise ConfigError(f"asvit depths, width, expansions and splits must be positive: {self}")
        if self.kernels[0] < 1 or min(self.kernels[1:]) < 2:
            raise ConfigError(f"asvit kernels {self.kernels}: the re-embeddings need K >= 2")
        for i, (w, h) in enumerate(zip(self.widths, self.stage_heads)):
            if w % h:
                raise ConfigError(
                    f"asvit stage {i + 1}: width {w} is not divisible by its {h} heads "
                    f"(heads={self.heads} gives {self.stage_heads}); pick a width C that "
                    f"is a multiple of {self.heads // 8 or 1} or fewer heads")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"asvit.drop_path={self.drop_path} must be in [0, 1)")

    # ------------------------------------------------------------------ arch strings
    def arch(self) -> str:
        stages = "|".join(f"{k},{s},{e},{d}" for k, s, e, d in
                          zip(self.kernels, self.splits, self.expansions, self.depths))
        return f"{stages}|{self.heads},{self.width}"

    @classmethod
    def from_arch(cls, arch: str, **overrides: Any) -> AsViTConfig:
        """'8,2,3|4,1,2|4,1,4|4,1,6|32' (seed) or '8,2,3,5|...|32,180' (with depths and C)."""
        parts = arch.strip().split("|")
        try:
            if len(parts) != 5:
                raise ValueError("5 '|'-separated parts expected")
            stages = [[int(v) for v in p.split(",")] for p in parts[:4]]
            tail = [int(v) for v in parts[4].split(",")]
            if {len(s) for s in stages} - {3, 4} or len({len(s) for s in stages}) != 1 \
                    or len(tail) not in (1, 2):
                raise ValueError("each stage is K,S,E or K,S,E,L and the tail H or H,C")
        except ValueError as exc:
            raise ConfigError(f"bad As-ViT topology {arch!r} ({exc}); write "
                              "K1,S1,E1[,L1]|K2,S2,E2[,L2]|K3,S3,E3[,L3]|K4,S4,E4[,L4]|H[,C]") from None
        fields: dict[str, Any] = dict(kernels=tuple(s[0] for s in stages),
                                      splits=tuple(s[1] for s in stages),
                                      expansions=tuple(s[2] for s in stages), heads=tail[0])
        if len(stages[0]) == 4:
            fields["depths"] = tuple(s[3] for s in stages)
        if len(tail) == 2:
            fields["width"] = tail[1]
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **overrides: Any) -> AsViTConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


SEED = "8,2,3|4,1,2|4,1,4|4,1,6|32"  # the searched topology (public code README)
ASVIT_MODELS = {
    "asvit-seed": SEED,  # one block per stage, C = 32: what the search scores
    # Small and Base: the paper reports only their sizes (29.0M / 5.3 G and 52.6M / 8.9 G MACs at
    # 224 px, Table 4); their depths and widths are not public. These are reconstructions: the
    # seed grown along one monotone path that ends at the public Large, matching those sizes
    # within 1% (tests/test_asvit.py re-derives them; README's As-ViT section has the rule).
    "asvit-small": "8,2,3,3|4,1,2,2|4,1,4,1|4,1,6,2|32,96",
    "asvit-base": "8,2,3,3|4,1,2,2|4,1,4,1|4,1,6,2|32,132",
    "asvit-large": "8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180",  # public code README
}


def asvit_config(name_or_arch: str, **overrides: Any) -> AsViTConfig:
    """A named As-ViT (asvit-seed / -small / -base / -large) or a topology string."""
    arch = ASVIT_MODELS.get(name_or_arch, name_or_arch)
    if "|" not in arch:
        raise ConfigError(f"unknown As-ViT model {name_or_arch!r}; choose one of "
                          f"{list(ASVIT_MODELS)} or write a topology string such as {SEED!r}")
    overrides.setdefault("name", name_or_arch if name_or_arch in ASVIT_MODELS else f"asvit:{arch}")
    return AsViTConfig.from_arch(arch, **overrides)


# ---------------------------------------------------------------------------------- geometry
def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME' padding (before, after): output ceil(size / stride) for any kernel span."""
    span = dilation * (kernel - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


class Tokenizer(nn.Module):
    """Conv K1 x K1 (SAME padding) + LayerNorm; stride and dilation are switchable."""

    def __init__(self, cfg: AsViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.widths[0], cfg.kernels[0])
        self.norm = nn.LayerNorm(cfg.widths[0], eps=cfg.norm_eps)
        self.stride, self.dilation = cfg.tokenizer_stride, cfg.tokenizer_dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.proj.kernel_size[0]
        top, bottom = same_padding(x.shape[-2], k, self.stride, self.dilation)
        left, right = same_padding(x.shape[-1], k, self.stride, self.dilation)
        x = F.pad(x, (left, right, top, bottom))
        x = F.conv2d(x, self.proj.weight, self.proj.bias, stride=self.stride, dilation=self.dilation)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)


class ReEmbed(nn.Module):
    """Overlapping patch merging: K x K neighbourhoods at stride 2, LayerNorm, Linear (no bias)."""

    def __init__(self, dim: int, out: int, kernel: int, eps: float) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(dim * kernel * kernel, eps=eps)
        self.reduction = nn.Linear(dim * kernel * kernel, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        top, bottom = same_padding(h, self.kernel, 2)
        left, right = same_padding(w, self.kernel, 2)
        x = F.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom))
        cols = F.unfold(x, self.kernel, stride=2)  # (B, C*K*K, L), channel-major
        gh, gw = math.ceil(h / 2), math.ceil(w / 2)
        cols = cols.transpose(1, 2).reshape(b, gh, gw, c * self.kernel**2)
        return self.reduction(self.norm(cols))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each of split x split windows of the token grid."""

    def __init__(self, dim: int, heads: int, split: int) -> None:
        super().__init__()
        self.heads, self.split = heads, split
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # As layers.Attention.recorded: a list (vitscale.analysis) takes the explicit path and
        # collects (windows * B, heads, n, n) probabilities; None keeps the fused kernel.
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = math.ceil(h / self.split), math.ceil(w / self.split)  # window size
        ph, pw = (-h) % wh, (-w) % ww
        mask = None
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            valid = torch.zeros(1, h + ph, w + pw, 1, dtype=torch.bool, device=x.device)
            valid[:, :h, :w] = True
            mask = _windows(valid, wh, ww).reshape(-1, 1, 1, wh * ww)  # keys that are real tokens
        nh, nw = (h + ph) // wh, (w + pw) // ww
        win = _windows(x, wh, ww)  # (B * nh * nw, wh * ww, C)
        n = wh * ww
        qkv = self.qkv(win).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if mask is not None:
            mask = mask.repeat(b, 1, 1, 1)
        if self.recorded is None:
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        else:
            scores = qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.softmax(dim=-1)
            self.recorded.append(attn.detach())
            out = attn @ qkv[2]
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c))
        out = out.reshape(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * wh, nw * ww, c)
        return out[:, :h, :w]


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


class AsViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, split: int, expansion: int, drop_path: float,
                 eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, heads, split)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * expansion, "gelu")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AsViT(nn.Module):
    """The As-ViT classifier; `forward_features(x, return_stages=True)` gives every stage's
    (B, C_i, H_i, W_i) map for dense tasks."""

    def __init__(self, cfg: AsViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths, heads = cfg.widths, cfg.stage_heads
        self.tokenizer = Tokenizer(cfg)
        total = sum(cfg.depths)
        rates = iter([cfg.drop_path * i / max(total - 1, 1) for i in range(total)])
        self.stages = nn.ModuleList()
        self.reembeds = nn.ModuleList()
        for i in range(4):
            if i:
                self.reembeds.append(ReEmbed(widths[i - 1], widths[i], cfg.kernels[i], cfg.norm_eps))
            self.stages.append(nn.Sequential(*[
                AsViTBlock(widths[i], heads[i], cfg.splits[i], cfg.expansions[i], next(rates),
                           cfg.norm_eps) for _ in range(cfg.depths[i])]))
        d = widths[-1]
        self.num_features = d
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.pre_logits = nn.Sequential()
        self.pre_logits.add_module("fc", nn.Linear(d, d))
        self.pre_logits.add_module("act", nn.Tanh())
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init)

    def set_tokenizer(self, stride: int, dilation: int = 1) -> None:
        """Re-tokenize: the first projection's (stride, dilation), same weights."""
        if stride < 1 or dilation < 1:
            raise ConfigError(f"tokenizer stride and dilation must be >= 1, got ({stride}, {dilation})")
        self.tokenizer.stride, self.tokenizer.dilation = stride, dilation
        self.cfg = self.cfg.replace(tokenizer_stride=stride, tokenizer_dilation=dilation)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.tokenizer(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i:
                x = self.reembeds[i - 1](x)
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Final-stage tokens after the final norm (B, N, D); with return_stages, the list of
        every stage's output as (B, C_i, H_i, W_i)."""
        outs = self._stages(x)
        if return_stages:
            return [o.permute(0, 3, 1, 2) for o in outs]
        return self.norm(outs[-1].flatten(1, 2))

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.forward_features(x).mean(dim=1))

    def forward_prenorm_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage tokens averaged before the final norm and head: what As-ViT's
        complexity measures (L^E, NTK condition number) look at."""
        return self._stages(x)[-1].flatten(1, 2).mean(dim=1)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, x: torch.Tensor, outputs: str = "logits"):
        """`outputs`: "logits", or "pooled": (logits, the pre-logits representation)."""
        if outputs not in ("logits", "pooled"):
            raise ValueError(f"outputs={outputs!r}; an As-ViT gives 'logits' or 'pooled'")
        pooled = self.forward_pooled(x)
        logits = self.head(pooled)
        return (logits, pooled) if outputs == "pooled" else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init(module: nn.Module) -> None:
    # The public code: Linear weights truncated normal std 0.02, biases 0, LayerNorm (1, 0).
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_asvit(name_or_cfg: str | AsViTConfig, **overrides: Any) -> AsViT:
    cfg = name_or_cfg if isinstance(name_or_cfg, AsViTConfig) else asvit_config(name_or_cfg)
    return AsViT(cfg.replace(**overrides) if overrides else cfg)


# ---------------------------------------------------------------------------------- counts
def stage_grids(cfg: AsViTConfig, img_size: int | tuple[int, int] | None = None,
                stride: int | None = None) -> list[tuple[int, int]]:
    """The token grid of each stage (SAME padding: ceil divisions)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or cfg.img_size)
    s = stride or cfg.tokenizer_stride
    grids = [(math.ceil(h / s), math.ceil(w / s))]
    for _ in range(3):
        gh, gw = grids[-1]
        grids.append((math.ceil(gh / 2), math.ceil(gw / 2)))
    return grids


def asvit_counts(cfg: AsViTConfig, img_size: int | tuple[int, int] | None = None,
                 stride: int | None = None):
    """Parameters and forward FLOPs per image (2 x multiply-accumulates of matmuls and
    convolutions, attention included, padded windows counted as computed)."""
    from vitscale.models.counts import Counts

    widths, k1 = cfg.widths, cfg.kernels[0]
    grids = stage_grids(cfg, img_size, stride)
    params = cfg.in_chans * k1 * k1 * widths[0] + widths[0] + 2 * widths[0]
    macs = grids[0][0] * grids[0][1] * cfg.in_chans * k1 * k1 * widths[0]
    for i, (d, (h, w)) in enumerate(zip(widths, grids)):
        n = h * w
        if i:
            fan_in = cfg.kernels[i] * cfg.kernels[i] * widths[i - 1]
            params += 2 * fan_in + fan_in * d
            macs += n * fan_in * d
        hidden = cfg.expansions[i] * d
        wh, ww = math.ceil(h / cfg.splits[i]), math.ceil(w / cfg.splits[i])
        padded = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
        windows = padded // (wh * ww)
        block_params = 4 * d + 4 * d * d + 4 * d + 2 * d * hidden + hidden + d
        block_macs = padded * 4 * d * d + 2 * windows * (wh * ww) ** 2 * d + n * 2 * d * hidden
        params += cfg.depths[i] * block_params
        macs += cfg.depths[i] * block_macs
    d = widths[-1]
    params += 2 * d + d * d + d
    macs += d * d
    if cfg.num_classes > 0:
        params += d * cfg.num_classes + cfg.num_classes
        macs += d * cfg.num_classes
    return Counts(params, 2 * macs)
