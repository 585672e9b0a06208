"""The ViT paper's hybrid stem: a BiT ResNet whose feature map feeds the patch projection.

Layout and parameter names follow timm's R+ViT hybrids (`vit_small_r26_s32_224`,
`vit_base_r50_s16_224`, `vit_large_r50_s32_224`), so their state dicts load with `strict=True`:

    patch_embed.backbone.stem.{conv,norm}
    patch_embed.backbone.stages.{s}.blocks.{b}.{downsample.conv,downsample.norm,conv1,norm1,...}
    patch_embed.proj

With `hybrid_layers=()` the backbone is the root block alone (timm's `vit_tiny_r_s16_p8`, the
AugReg R_Ti_16 files); its keys are then `patch_embed.backbone.{conv,norm}`.

The ResNet uses non-pre-activation bottlenecks (conv -> GroupNorm -> ReLU, residual add, ReLU),
weight-standardised convolutions and TensorFlow "SAME" padding, as the original JAX hybrids do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.errors import ConfigError
from vitscale.models.config import ModelConfig, pair

GN_GROUPS = 32
# timm's GroupNormAct default, which its converted hybrid weights were checked against. Flax's
# GroupNorm (the JAX originals) uses 1e-6; the difference is far below bf16 resolution.
GN_EPS = 1e-5
EXPANSION = 4  # bottleneck output channels / bottleneck channels


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis: the output has ceil(size / stride)
    positions and any odd padding pixel goes after, not before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
              value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[-2], kernel[0], stride[0])
    left, right = _same_pad(x.shape[-1], kernel[1], stride[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Bias-free convolution with weight standardisation (zero mean, unit variance over each
    filter's fan-in, recomputed every call) and TF "SAME" padding."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int = 1,
                 eps: float = 1e-8) -> None:
        # Stride 1 with an odd kernel pads symmetrically whatever the input size, so the padding
        # can live in the conv itself; otherwise it depends on the input and is added per call.
        static_pad = stride == 1 and kernel % 2 == 1
        super().__init__(in_chans, out_chans, kernel, stride=stride,
                         padding=kernel // 2 if static_pad else 0, bias=False)
        self.static_pad = static_pad
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static_pad:
            x = _pad_same(x, self.kernel_size, self.stride)
        return F.conv2d(x, self.standardized_weight(), None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups), optionally followed by ReLU; the activation has no parameters, so
    the state dict holds only `weight` and `bias` as timm's GroupNormAct does."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(GN_GROUPS, channels, eps=GN_EPS)
        self.apply_act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.apply_act else x


class MaxPool2dSame(nn.Module):
    """3x3 stride-2 max-pool with TF "SAME" padding (padded with -inf, so pads never win)."""

    def __init__(self, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel = (kernel, kernel)
        self.stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel, self.stride, value=-math.inf)
        return F.max_pool2d(x, self.kernel, self.stride)


class Stem(nn.Module):
    """Root block: 7x7 stride-2 conv, GroupNorm + ReLU, 3x3 stride-2 max-pool (stride 4)."""

    def __init__(self, in_chans: int, width: int, eps: float) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, width, 7, stride=2, eps=eps)
        self.norm = GroupNormAct(width)
        self.pool = MaxPool2dSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


class Downsample(nn.Module):
    """Projection shortcut of a stage's first block: 1x1 conv (strided) + GroupNorm, no ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, out_chans, 1, stride=stride, eps=eps)
        self.norm = GroupNormAct(out_chans, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    def __init__(self, in_chans: int, mid: int, out_chans: int, stride: int, project: bool,
                 eps: float) -> None:
        super().__init__()
        self.downsample = Downsample(in_chans, out_chans, stride, eps) if project else None
        self.conv1 = StdConv2dSame(in_chans, mid, 1, eps=eps)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride, eps=eps)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_chans, 1, eps=eps)
        self.norm3 = GroupNormAct(out_chans, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_chans: int, mid: int, depth: int, stride: int, eps: float) -> None:
        super().__init__()
        out = mid * EXPANSION
        # Every stage's first block projects its shortcut, even stage 0 with stride 1 (BiT).
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chans if b == 0 else out, mid, out, stride if b == 0 else 1,
                       project=b == 0, eps=eps)
            for b in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNet(nn.Module):
    """BiT ResNet body without head: stem, then stage s with `width * 2**s` bottleneck channels
    (4x that out), stride 1 for stage 0 and 2 afterwards."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, eps = cfg.hybrid_width, cfg.hybrid_ws_eps
        self.stem = Stem(cfg.in_chans, w, eps)
        self.stages = nn.Sequential()
        prev = w
        for s, depth in enumerate(cfg.hybrid_layers):
            mid = w * 2 ** s
            self.stages.add_module(str(s), Stage(prev, mid, depth, 1 if s == 0 else 2, eps))
            prev = mid * EXPANSION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def feature_channels(cfg: ModelConfig) -> int:
    """Channels of the ResNet output that the projection sees."""
    if not cfg.hybrid_layers:
        return cfg.hybrid_width
    return cfg.hybrid_width * 2 ** (len(cfg.hybrid_layers) - 1) * EXPANSION


def _check(cfg: ModelConfig) -> None:
    if cfg.stem != "hybrid":
        raise ConfigError(f"HybridEmbed needs model.stem='hybrid', got {cfg.stem!r}")
    if cfg.hybrid_width < GN_GROUPS or cfg.hybrid_width % GN_GROUPS:
        raise ConfigError(
            f"model.hybrid_width={cfg.hybrid_width} must be a positive multiple of {GN_GROUPS} "
            f"(GroupNorm uses {GN_GROUPS} groups); e.g. 32 or 64"
        )
    if any(d < 1 for d in cfg.hybrid_layers):
        raise ConfigError(
            f"model.hybrid_layers={cfg.hybrid_layers} needs at least one block per stage"
        )


class HybridEmbed(nn.Module):
    """BiT ResNet features -> `proj` conv (kernel = stride = `cfg.embed_patch`) -> tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check(cfg)
        # Without stages timm's backbone *is* the root block; keep that nesting for its names.
        self.backbone: nn.Module = (ResNet(cfg) if cfg.hybrid_layers
                                    else Stem(cfg.in_chans, cfg.hybrid_width, cfg.hybrid_ws_eps))
        self.num_features = feature_channels(cfg)
        self.proj = nn.Conv2d(self.num_features, cfg.width, kernel_size=cfg.embed_patch,
                              stride=cfg.embed_patch)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BiT-style ResNet init: kaiming-normal (fan-out) convs, GroupNorm ones / zeros, and
        the last GroupNorm scale of each block zeroed so every block starts as the identity on
        its shortcut. `proj` is left to `VisionTransformer.init_weights` (like a patch conv)."""
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.backbone.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x))
        return x.flatten(2).transpose(1, 2)


def hybrid_counts(cfg: ModelConfig, img_size: int | tuple[int, int] | None = None
                  ) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of `HybridEmbed(cfg)` at `img_size`.

    FLOPs are 2 x the multiply-accumulates of every convolution (what
    `torch.utils.flop_counter.FlopCounterMode` counts); GroupNorm, ReLU, pooling, the residual
    adds and the weight standardisation are not counted. Spatial sizes follow SAME padding
    (ceil(size / stride)) through the ResNet and floor division in the projection.
    """
    _check(cfg)
    h, w = pair(img_size) if img_size is not None else cfg.img_size
    params = 0
    flops = 0

    def conv(c_in: int, c_out: int, k: int, stride: int) -> None:
        nonlocal h, w, params, flops
        h, w = math.ceil(h / stride), math.ceil(w / stride)
        params += c_in * c_out * k * k
        flops += 2 * h * w * c_in * c_out * k * k

    def norm(c: int) -> None:
        nonlocal params
        params += 2 * c

    width = cfg.hybrid_width
    conv(cfg.in_chans, width, 7, 2)
    norm(width)
    h, w = math.ceil(h / 2), math.ceil(w / 2)  # max-pool
    prev = width
    for s, depth in enumerate(cfg.hybrid_layers):
        mid, out = width * 2 ** s, width * 2 ** s * EXPANSION
        for b in range(depth):
            stride = 2 if s > 0 and b == 0 else 1
            in_h, in_w = h, w
            if b == 0:
                conv(prev, out, 1, stride)  # projection shortcut
                norm(out)
                h, w = in_h, in_w
            conv(out if b else prev, mid, 1, 1)
            norm(mid)
            conv(mid, mid, 3, stride)
            norm(mid)
            conv(mid, out, 1, 1)
            norm(out)
        prev = out

    ph, pw = cfg.embed_patch
    gh, gw = h // ph, w // pw
    params += prev * cfg.width * ph * pw + cfg.width
    flops += 2 * gh * gw * prev * cfg.width * ph * pw
    return params, flops
