"""Detection backbones for torchvision's detectors.

`vitdet_backbone`: a plain ViT (any `vitscale.models.load` reads) with ViTDet's simple feature
pyramid (Li et al. 2022) on its last stride-16 map: for each scale s of (4, 2, 1, 0.5), resample
the map by s (4: two stride-2 transposed convolutions with LayerNorm + GELU between them, 2: one,
1: identity, 0.5: 2 x 2 max-pool), then a 1 x 1 convolution to `out_channels` + LayerNorm and a
3 x 3 convolution + LayerNorm; one more level max-pooled from the coarsest (kernel 1, stride 2)
for the RPN. `asvit_backbone`: As-ViT's four stages (strides 4 / 8 / 16 / 32) through
torchvision's FPN with the same extra pooled level.

Both return a module with `out_channels`, `strides` (one per level, the pooled one last) and
`roi_levels` (the level names an RoI pooler reads), whose forward gives an OrderedDict of
(B, out_channels, H_l, W_l) maps named "0", "1", ... and "pool", torchvision's names, so they plug
into FasterRCNN / RetinaNet / MaskRCNN as torchvision's own FPN backbones do (`detector`).
A level at stride s has ceil(H / s) x ceil(W / s) cells of the (patch-padded) input.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.errors import ConfigError


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (each position normalised alone)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _resample(dim: int, scale: float) -> tuple[nn.Module, int]:
    """(the layers that resample a stride-p map by `scale`, their output channels)."""
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2, ceil_mode=True), dim
    raise ConfigError(f"vitdet_backbone scale {scale} is not one of 4, 2, 1, 0.5 (ViTDet's "
                      "simple feature pyramid); pass scales=(4, 2, 1, 0.5) or a subset")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on one (B, dim, h, w) map: one level per scale, plus the
    max-pooled extra level when `extra_pool`."""

    def __init__(self, dim: int, scales: Sequence[float] = (4, 2, 1, 0.5), out_channels: int = 256,
                 extra_pool: bool = True) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or list(scales) != sorted(set(scales), reverse=True):
            raise ConfigError(f"vitdet_backbone scales {scales} must be distinct and decreasing, "
                              "e.g. (4, 2, 1, 0.5)")
        if 4 in scales and dim % 4 or 2 in scales and dim % 2:
            raise ConfigError(f"vitdet_backbone: width {dim} must be divisible by 4 for scale 4 "
                              "(and by 2 for scale 2)")
        self.scales = scales
        self.extra_pool = extra_pool
        self.levels = nn.ModuleList()
        for scale in scales:
            resample, channels = _resample(dim, scale)
            self.levels.append(nn.Sequential(OrderedDict(
                resample=resample,
                lateral=nn.Conv2d(channels, out_channels, 1, bias=False),
                lateral_norm=LayerNorm2d(out_channels),
                output=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                output_norm=LayerNorm2d(out_channels),
            )))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [level(x) for level in self.levels]
        if self.extra_pool:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


def _level_names(n: int, extra_pool: bool) -> list[str]:
    return [str(i) for i in range(n)] + (["pool"] if extra_pool else [])


class ViTDetBackbone(nn.Module):
    """A ViT and its simple feature pyramid; see `vitdet_backbone`."""

    def __init__(self, vit: nn.Module, scales: Sequence[float] = (4, 2, 1, 0.5),
                 out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        cfg = vit.cfg
        if cfg.patch[0] != cfg.patch[1]:
            raise ConfigError(f"vitdet_backbone needs square patches, the model has {cfg.patch}")
        if cfg.posemb == "learn" and not cfg.dynamic_img_size:
            vit.cfg = cfg.replace(dynamic_img_size=True)  # posemb resampled to each input's grid
        self.body = vit
        self.patch = cfg.patch[0]
        self.pyramid = SimpleFeaturePyramid(cfg.width, scales, out_channels, extra_pool)
        self.out_channels = out_channels
        strides = [self.patch / s for s in self.pyramid.scales]
        self.strides = [int(s) if float(s).is_integer() else s for s in strides]
        if extra_pool:
            self.strides.append(self.strides[-1] * 2)
        self.names = _level_names(len(scales), extra_pool)
        self.roi_levels = self.names[:len(scales)]
        self._noted = False

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p = self.patch
        bottom, right = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if bottom or right:
            if not self._noted:
                warnings.warn(f"vitdet_backbone: input {x.shape[-2]}x{x.shape[-1]} is not divisible "
                              f"by the patch {p}; zero-padded at the bottom / right to "
                              f"{x.shape[-2] + bottom}x{x.shape[-1] + right} (boxes keep their "
                              "coordinates)", stacklevel=2)
                self._noted = True
            x = F.pad(x, (0, right, 0, bottom))
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.body.forward_features(x)[:, self.body.num_prefix_tokens:]
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return OrderedDict(zip(self.names, self.pyramid(fmap)))


class AsViTBackbone(nn.Module):
    """As-ViT's four stage outputs through an FPN; see `asvit_backbone`."""

    def __init__(self, asvit: nn.Module, out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = asvit
        self.fpn = FeaturePyramidNetwork(list(asvit.cfg.widths), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels
        s = asvit.tokenizer.stride
        self.strides = [s, 2 * s, 4 * s, 8 * s] + ([16 * s] if extra_pool else [])
        self.names = _level_names(4, extra_pool)
        self.roi_levels = self.names[:4]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        stages = self.body.forward_features(x, return_stages=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(stages)))


def _load(model):
    if isinstance(model, (str, Path)):
        from vitscale.models import load

        return load(model)
    return model


def vitdet_backbone(model, scales: Sequence[float] = (4, 2, 1, 0.5), out_channels: int = 256,
                    window_size: int | None = None, global_blocks: Sequence[int] | None = None,
                    extra_pool: bool = True) -> ViTDetBackbone:
    """ViTDet's backbone from a `VisionTransformer` or anything `vitscale.models.load` reads
    (vitscale, timm, big_vision .npz, transformers, hf-hub:). `window_size` / `global_blocks`
    switch the ViT to window attention (ViTDet: 14 with global blocks 2, 5, 8, 11 for ViT-B);
    None keeps the model's own. With a patch of 16 the levels' strides are 4, 8, 16, 32 (and 64,
    the extra pooled level). A learned position embedding is resampled to each input's grid; an
    input not divisible by the patch is zero-padded (with a warning once)."""
    from vitscale.models.vit import VisionTransformer

    model = _load(model)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"vitdet_backbone needs a ViT, got {type(model).__name__}; use "
                          "asvit_backbone for an As-ViT")
    if window_size is not None or global_blocks is not None:
        model.set_windows(model.cfg.window_size if window_size is None else window_size,
                          model.cfg.global_blocks if global_blocks is None else global_blocks)
    return ViTDetBackbone(model, scales, out_channels, extra_pool)


def asvit_backbone(model, out_channels: int = 256, extra_pool: bool = True) -> AsViTBackbone:
    """An FPN on As-ViT's four stages (strides 4, 8, 16, 32 at tokenizer stride 4; 64 pooled)."""
    from vitscale.models.asvit import AsViT

    model = _load(model)
    if not isinstance(model, AsViT):
        raise ConfigError(f"asvit_backbone needs an As-ViT, got {type(model).__name__}; use "
                          "vitdet_backbone for a plain ViT")
    return AsViTBackbone(model, out_channels, extra_pool)


DETECTORS = ("fasterrcnn", "retinanet", "maskrcnn")


def anchor_generator(backbone: nn.Module, kind: str = "fasterrcnn",
                     sizes: Sequence[float] | None = None,
                     aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
    """Anchors matching the backbone's levels: by default 8 x the level's stride (torchvision's
    32 ... 512 for strides 4 ... 64); RetinaNet adds 2^(1/3) and 2^(2/3) of each."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    base = list(sizes) if sizes is not None else [8 * s for s in backbone.strides]
    if len(base) != len(backbone.strides):
        raise ConfigError(f"{len(base)} anchor sizes for {len(backbone.strides)} feature levels; "
                          "give one size per level")
    octave = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if kind == "retinanet" else (1.0,)
    per_level = tuple(tuple(int(round(b * o)) for o in octave) for b in base)
    return AnchorGenerator(per_level, (tuple(aspect_ratios),) * len(per_level))


def roi_pooler(backbone: nn.Module, output_size: int = 7):
    """torchvision's MultiScaleRoIAlign over the backbone's RoI levels (not the pooled one)."""
    from torchvision.ops import MultiScaleRoIAlign

    return MultiScaleRoIAlign(list(backbone.roi_levels), output_size=output_size, sampling_ratio=2)


def detector(kind: str, backbone: nn.Module, num_classes: int, min_size: int = 800,
             max_size: int = 1333, anchor_sizes: Sequence[float] | None = None,
             image_mean: Sequence[float] = (0.5, 0.5, 0.5),
             image_std: Sequence[float] = (0.5, 0.5, 0.5), representation_size: int = 1024,
             **kwargs):
    """torchvision's `kind` (fasterrcnn | retinanet | maskrcnn) on `backbone`, with its anchor
    generator and RoI poolers, and images padded to a multiple of the coarsest stride (so each
    level's stride is exact). `num_classes` counts the background (torchvision's convention:
    foreground classes + 1). The default mean / std map [0, 1] images to vitscale's [-1, 1];
    `representation_size`: the width of the two-layer box head (torchvision's 1024); other
    keyword arguments go to the torchvision class (e.g. box_batch_size_per_image)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    if kind not in DETECTORS:
        raise ConfigError(f"detector {kind!r} is not one of {', '.join(DETECTORS)}")
    if num_classes < 2:
        raise ConfigError(f"detector num_classes={num_classes} counts the background; give the "
                          "number of object classes + 1 (>= 2)")
    cls = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "maskrcnn": MaskRCNN}[kind]
    _check_options(cls, kwargs)
    stride = max(backbone.strides)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                  image_std=list(image_std), size_divisible=int(math.ceil(stride)), **kwargs)
    anchors = anchor_generator(backbone, kind, anchor_sizes)
    if kind == "retinanet":
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, **common)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation_size)
    if kind == "maskrcnn":
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        return MaskRCNN(backbone, None, rpn_anchor_generator=anchors,
                        box_roi_pool=roi_pooler(backbone, 7), mask_roi_pool=roi_pooler(backbone, 14),
                        box_head=box_head,
                        box_predictor=FastRCNNPredictor(representation_size, num_classes),
                        mask_predictor=MaskRCNNPredictor(256, 256, num_classes), **common)
    return FasterRCNN(backbone, None, rpn_anchor_generator=anchors,
                      box_roi_pool=roi_pooler(backbone, 7), box_head=box_head,
                      box_predictor=FastRCNNPredictor(representation_size, num_classes), **common)


def _check_options(cls: type, options: dict) -> None:
    """A one-line error for keyword arguments the torchvision class would silently drop (its
    **kwargs reach GeneralizedRCNNTransform, which ignores unknown ones)."""
    import inspect

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    taken = set(inspect.signature(cls.__init__).parameters)
    taken |= set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters)
    taken -= {"self", "kwargs", "backbone", "num_classes", "size_divisible", "min_size", "max_size",
              "image_mean", "image_std", "anchor_generator", "rpn_anchor_generator", "box_roi_pool",
              "mask_roi_pool", "box_head", "box_predictor", "mask_predictor"}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise ConfigError(f"{cls.__name__} takes no option(s) {unknown}; valid ones: "
                          f"{', '.join(sorted(taken))}")
