"""Accuracy and calibration under generated corruptions at ImageNet-C's five severities
(Hendrycks & Dietterich 2019): Gaussian noise, Gaussian blur, JPEG and contrast, with
ImageNet-C's parameters per severity, made with torch / torchvision ops on [0, 1] images at the
model's input resolution.

The blur sigmas are ImageNet-C's, in pixels of the image as the model sees it (so at 16 px a
severity blurs far more of the object than at 224 px); the kernel is 3 sigma wide each side,
cut to the image (2 * side - 1) where that is smaller."""

from __future__ import annotations

import torch

from vitscale.analysis.attribution import gaussian_blur
from vitscale.errors import ConfigError

SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on [0, 1] pixels
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),  # sigma in pixels
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # deviation from the image mean kept
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """`images` (B, C, H, W) in [0, 1], corrupted at severity 1..5 (0: unchanged)."""
    if name not in SEVERITY_PARAMS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise ConfigError(f"severity {severity} must be 0 (clean) to 5")
    if severity == 0:
        return images
    c = SEVERITY_PARAMS[name][severity - 1]
    if name == "gaussian_noise":
        gen = torch.Generator().manual_seed(seed * 1000 + severity)
        noise = torch.randn(images.shape, generator=gen, dtype=images.dtype)
        return (images + c * noise.to(images.device)).clamp(0, 1)
    if name == "gaussian_blur":
        return gaussian_blur(images, c).clamp(0, 1)
    if name == "contrast":
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        return ((images - mean) * c + mean).clamp(0, 1)
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    out = decode_jpeg(encode_jpeg(list(u8), quality=int(c)))
    return torch.stack(out).to(images.device, images.dtype) / 255.0


@torch.no_grad()
def robustness(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               corruptions: tuple[str, ...] = CORRUPTIONS, batch_size: int = 128) -> dict:
    """Top-1 accuracy and ECE (15 bins) of `model` on `images` (its [-1, 1] inputs) clean and
    under each corruption at severities 1-5: {"clean": {...}, "corruptions": {name: [per
    severity {"accuracy", "ece"}]}, "mean_accuracy": over all corrupted sets}."""
    from vitscale.eval.classify import classification_metrics

    model.eval()
    pixels = (images + 1) / 2

    def score(x01: torch.Tensor) -> dict:
        logits = torch.cat([model(b * 2 - 1) for b in x01.split(batch_size)])
        m = classification_metrics(logits, labels, num_classes)
        return {"accuracy": m["top1"], "ece": m["ece"]}

    out = {"clean": score(pixels), "corruptions": {}, "n": len(labels),
           "params": {k: list(SEVERITY_PARAMS[k]) for k in corruptions}}
    for name in corruptions:
        out["corruptions"][name] = [score(corrupt(pixels, name, s)) for s in range(1, 6)]
    accs = [r["accuracy"] for rows in out["corruptions"].values() for r in rows]
    out["mean_accuracy"] = sum(accs) / len(accs)
    return out
