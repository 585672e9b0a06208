"""Batch Mixup and CutMix: (images, int labels) -> (images, soft targets of shape (B, num_classes)).

Both pair each example with its neighbour in the batch rolled by one (big_vision's choice: no
second permutation to draw or communicate). Every random number comes from the explicit
torch.Generator passed in, so a (seed, step)-seeded generator reproduces the batch exactly.
Label smoothing is not applied here; the loss does it.

- Mixup (big_vision utils.get_mixup): lam ~ Beta(alpha, alpha), lam <- max(lam, 1 - lam) so each
  example stays the dominant one; x = lam x + (1 - lam) roll(x); t = lam y + (1 - lam) roll(y).
- CutMix (Yun et al. 2019): lam ~ Beta(alpha, alpha); a box of side sqrt(1 - lam) times the image
  side (rounded down to even, as the authors' code, timm and torchvision), centred uniformly at
  random and clipped to the image, is pasted from roll(x); lam is then corrected to the exact kept
  area, 1 - box area / image area, and t = lam y + (1 - lam) roll(y). Given the same lam and centre,
  the result equals torchvision.transforms.v2.CutMix's exactly (tests/test_data.py).
- mix_batch: with both alphas > 0, one of the two per batch, CutMix with probability 0.5 (timm's
  switch_prob); with one alpha > 0, that one; with none, one-hot targets and the images unchanged.

Beta draws use numpy seeded from the generator, since torch's Beta sampler takes no generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _beta(alpha: float, gen: torch.Generator) -> float:
    seed = int(torch.randint(0, 2**63 - 1, (), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).to(torch.float32)


def mixup(images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images, soft targets, lam) with lam = max(b, 1 - b), b ~ Beta(alpha, alpha)."""
    lam = _beta(alpha, gen)
    lam = max(lam, 1.0 - lam)
    targets = one_hot(labels, num_classes)
    mixed = lam * images + (1.0 - lam) * images.roll(1, dims=0)
    return mixed, lam * targets + (1.0 - lam) * targets.roll(1, dims=0), lam


def cutmix_box(height: int, width: int, lam: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box covering about 1 - lam of the image, centred uniformly at random.

    The CutMix authors' rand_bbox, as timm's and torchvision's: half-sides int(side * sqrt(1 - lam))
    // 2 on either side of the centre pixel (so an even side before clipping), clipped to the image.
    """
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    cy = int(torch.randint(height, (), generator=gen))
    cx = int(torch.randint(width, (), generator=gen))
    y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
    x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
    return y0, y1, x0, x1


def cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images with a box pasted from the rolled batch, soft targets, lam = kept area fraction)."""
    height, width = images.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(height, width, _beta(alpha, gen), gen)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images.roll(1, dims=0)[..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    targets = one_hot(labels, num_classes)
    return mixed, lam * targets + (1.0 - lam) * targets.roll(1, dims=0), lam


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, gen: torch.Generator,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              switch_prob: float = 0.5, with_lam: bool = False):
    """(images, soft targets (B, num_classes)): Mixup, CutMix, one of them per batch, or neither.
    `with_lam`: (images, targets, lam) with lam the weight of each example's own label (1 when
    nothing was mixed), so other per-example targets can be mixed alike: lam t + (1 - lam) roll(t)."""
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if use_mixup and use_cutmix:
        if float(torch.rand((), generator=gen)) < switch_prob:
            use_mixup = False
        else:
            use_cutmix = False
    if use_cutmix:
        out = cutmix(images, labels, num_classes, cutmix_alpha, gen)
    elif use_mixup:
        out = mixup(images, labels, num_classes, mixup_alpha, gen)
    else:
        out = (images, one_hot(labels, num_classes), 1.0)
    return out if with_lam else out[:2]


def mix_like(values: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-example values (B, ...) mixed as mix_batch mixed the batch they belong to."""
    return values if lam == 1.0 else lam * values + (1.0 - lam) * values.roll(1, dims=0)
