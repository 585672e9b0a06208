"""Image transforms (torchvision.transforms.v2) and the AugReg augmentation presets.

Train (big_vision `inception_crop|flip_lr|randaug(N,M)|value_range(-1,1)`):
    RandomResizedCrop(img_size, scale=(crop_scale_min, 1), ratio=(3/4, 4/3), bilinear; antialiased,
    torchvision's default, where TF's resize is not: a small difference on strong down-scaling)
    -> horizontal flip (DataConfig.flip; by default on, except for glyph sources such as digits
    and MNIST, where a mirrored glyph is another glyph or none) -> RandAugment(N, M) when N > 0
    -> float in [-1, 1].
Eval:
    natural images: resize the shorter side to img_size / 0.875 (256 for 224), center-crop img_size.
    small images (the source's first image is at most img_size on its longer side, e.g. digits at
    8x8, CIFAR at 32x32): resize the whole image to img_size x img_size, no crop. Such images are
    framed tightly, and a 12.5% border crop would cut away digits' strokes; big_vision's CIFAR
    transfer configs also plain-resize. `build_data` applies this rule per source.

Value range: uint8 x -> x / 127.5 - 1, so 0 -> -1 and 255 -> +1 exactly (big_vision value_range(-1,1)).

RandAugment follows big_vision's (TF tpu autoaugment) definition, not torchvision's v2.RandAugment,
whose op set and magnitude scale differ: each of N layers applies one op drawn uniformly from 16
(AutoContrast Equalize Invert Rotate Posterize Solarize Color Contrast Brightness Sharpness ShearX
ShearY TranslateX TranslateY Cutout SolarizeAdd), always; magnitude M is a level on a 0..10 scale
(values above 10, as in strong1/2's M=20, extrapolate linearly exactly as big_vision does): rotate
3M degrees, shear 0.03M, translate M/10 * 100/224 of the side (to the nearest whole pixel), cutout
half-size M/10 * 40/224 of the side (big_vision's 100 and 40 pixels at 224 px, made relative so
small images work), enhance factor 0.18M + 0.1, posterize int(0.4M) bits, solarize threshold
int(25.6M), solarize-add int(11M); signed ops get a random sign; fill grey 128. Built from
torchvision.transforms.v2.functional ops, except AutoContrast (exact integer arithmetic).
tests/test_data.py compares every op at M = 5..10 with PIL's (the ops TF's port imitates).

MAGNITUDE 0 (AugReg "light1" = RandAugment(2, 0)) is NOT "off": as in big_vision, each op runs at
level 0. The geometric ops, Cutout and SolarizeAdd become the identity, but AutoContrast, Equalize
and Invert are level-free, Solarize at threshold 0 inverts the whole image, Posterize to 0 bits acts
as 1 bit (TF clamps the shift to 7), and Color/Contrast/Brightness/Sharpness use factor 0.1 (nearly
grey / flat / black / smoothed). 9 of the 16 ops change the image at level 0, so light1 alters
about 4 in 5 images, often strongly. Use augment=none or randaug_layers=0 to turn RandAugment off.
Known deviation: Contrast blends towards the mean grey level (PIL's definition), where TF's port
used the pixel count / 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vitscale.config import DataConfig
from vitscale.errors import ConfigError

# name -> (RandAugment layers, magnitude, mixup alpha), as big_vision's vit_i21k / vit_i1k configs.
AUGREG_PRESETS: dict[str, tuple[int, int, float]] = {
    "none": (0, 0, 0.0),
    "light1": (2, 0, 0.0),
    "light2": (2, 10, 0.2),
    "medium1": (2, 15, 0.2),
    "medium2": (2, 15, 0.5),
    "strong1": (2, 20, 0.5),
    "strong2": (2, 20, 0.8),
}

EVAL_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class AugmentSettings:
    randaug_layers: int
    randaug_magnitude: int
    mixup_alpha: float
    cutmix_alpha: float


def resolve_augment(cfg: DataConfig) -> AugmentSettings:
    """The preset's numbers with DataConfig's explicit fields (when not None) taking precedence."""
    if cfg.augment not in AUGREG_PRESETS:
        raise ConfigError(f"data.augment={cfg.augment!r} is not an AugReg preset; choose one of "
                          f"{', '.join(AUGREG_PRESETS)}")
    layers, magnitude, mixup = AUGREG_PRESETS[cfg.augment]
    if cfg.randaug_layers is not None:
        layers = cfg.randaug_layers
    if cfg.randaug_magnitude is not None:
        magnitude = cfg.randaug_magnitude
    if cfg.mixup_alpha is not None:
        mixup = cfg.mixup_alpha
    for key, value in (("randaug_layers", layers), ("randaug_magnitude", magnitude),
                       ("mixup_alpha", mixup), ("cutmix_alpha", cfg.cutmix_alpha)):
        if value < 0:
            raise ConfigError(f"data.{key}={value!r} must be >= 0")
    return AugmentSettings(int(layers), int(magnitude), float(mixup), float(cfg.cutmix_alpha))


# ---------------------------------------------------------------------------------- RandAugment
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
               "Cutout", "SolarizeAdd")
_FILL = [128.0, 128.0, 128.0]
_NEAREST = InterpolationMode.NEAREST


def _signed(value: float) -> float:
    return -value if float(torch.rand(())) < 0.5 else value


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Each channel's min -> 0 and max -> 255 linearly, truncated (PIL's and TF's AutoContrast), in
    exact integer arithmetic; torchvision's float32 version can map a channel's max to 254."""
    x = img.to(torch.int32)
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (x - low) * 255 // span.clamp(min=1), x).to(torch.uint8)


def apply_op(img: torch.Tensor, op: str, level: float) -> torch.Tensor:
    """One big_vision RandAugment op at `level` (0..10 scale) on a uint8 (3, H, W) tensor."""
    h, w = img.shape[-2:]
    frac = level / 10.0
    if op == "AutoContrast":
        return _autocontrast(img)
    if op == "Equalize":
        return F.equalize(img)
    if op == "Invert":
        return F.invert(img)
    if op == "Rotate":
        return F.rotate(img, _signed(frac * 30.0), interpolation=_NEAREST, fill=_FILL)
    if op == "Posterize":
        return F.posterize(img, min(max(int(frac * 4), 1), 8))
    if op == "Solarize":
        threshold = int(frac * 256)  # may exceed 255: compare in int16, not in uint8
        return torch.where(img.to(torch.int16) < threshold, img, 255 - img)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = frac * 1.8 + 0.1
        fn = {"Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
              "Brightness": F.adjust_brightness, "Sharpness": F.adjust_sharpness}[op]
        return fn(img, factor)
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(_signed(frac * 0.3)))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=_NEAREST, fill=_FILL, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        side = w if op == "TranslateX" else h
        # As TF's translate (and PIL's affine with offset `pixels`), pixel x reads x + pixels: the
        # content moves by -pixels. Reads are nearest-neighbour, so a whole-pixel shift (halves
        # rounded up, as PIL does) gives the same image, where torchvision's half-to-even grid
        # rounding would repeat every other row or column at a half-pixel shift.
        pixels = -math.floor(_signed(frac * 100.0 / 224.0 * side) + 0.5)
        shift = [pixels, 0] if op == "TranslateX" else [0, pixels]
        return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                        interpolation=_NEAREST, fill=_FILL)
    if op == "Cutout":
        pad = int(frac * 40.0 / 224.0 * min(h, w))
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        if pad > 0:
            img = img.clone()
            img[:, max(cy - pad, 0):min(cy + pad, h), max(cx - pad, 0):min(cx + pad, w)] = 128
        return img
    if op == "SolarizeAdd":
        added = (img.to(torch.int16) + int(frac * 110)).clamp(0, 255).to(torch.uint8)
        return torch.where(img < 128, added, img)
    raise ValueError(f"unknown RandAugment op {op!r}")


class RandAugment(torch.nn.Module):
    """big_vision RandAugment(num_layers, magnitude) on uint8 (3, H, W) tensors; see module docstring.

    Randomness comes from the global torch RNG, which the training stream seeds per sample.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 10) -> None:
        super().__init__()
        self.num_ops = num_ops
        self.magnitude = magnitude

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        out = img.as_subclass(torch.Tensor)
        for _ in range(self.num_ops):
            op = RANDAUG_OPS[int(torch.randint(len(RANDAUG_OPS), ()))]
            out = apply_op(out, op, float(self.magnitude))
        return out

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}"


class ValueRange(torch.nn.Module):
    """uint8 [0, 255] -> float32 [-1, 1] (big_vision value_range(-1, 1))."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.as_subclass(torch.Tensor).to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------- pipelines
def train_transform(img_size: int, crop_scale_min: float = 0.05, flip: bool = True,
                    randaug_layers: int = 0, randaug_magnitude: int = 0) -> v2.Compose:
    """PIL RGB image -> float32 (3, img_size, img_size) in [-1, 1], randomly augmented."""
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=InterpolationMode.BILINEAR, antialias=True),
    ]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaug_layers > 0:
        ops.append(RandAugment(randaug_layers, randaug_magnitude))
    ops.append(ValueRange())
    return v2.Compose(ops)


def eval_transform(img_size: int, resize_only: bool = False) -> v2.Compose:
    """PIL RGB image -> float32 (3, img_size, img_size) in [-1, 1], deterministic."""
    if resize_only:
        ops: list = [v2.ToImage(), v2.Resize((img_size, img_size),
                                             interpolation=InterpolationMode.BILINEAR, antialias=True)]
    else:
        ops = [v2.ToImage(),
               v2.Resize(int(round(img_size / EVAL_CROP_FRACTION)),
                         interpolation=InterpolationMode.BILINEAR, antialias=True),
               v2.CenterCrop(img_size)]
    return v2.Compose([*ops, ValueRange()])


def transforms_for(cfg: DataConfig, resize_only: bool, mirror_safe: bool = True
                   ) -> tuple[v2.Compose, v2.Compose]:
    """(train transform, eval transform) for a DataConfig; `mirror_safe` (the source's) decides
    flipping when cfg.flip is None."""
    aug = resolve_augment(cfg)
    flip = mirror_safe if cfg.flip is None else cfg.flip
    train = train_transform(cfg.img_size, cfg.crop_scale_min, flip, aug.randaug_layers,
                            aug.randaug_magnitude)
    return train, eval_transform(cfg.img_size, resize_only)
