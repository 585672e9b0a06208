"""Integrated Gradients (Sundararajan et al. 2017) of a class logit w.r.t. the input pixels,
through captum's `IntegratedGradients`, with the completeness gap that checks them."""

from __future__ import annotations

import math

import torch

from vitscale.errors import ConfigError

BASELINES = ("black", "blur")


def baseline_for(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The IG starting point: "black" (value -1, i.e. pixel 0, in the models' [-1, 1] range) or
    "blur" (each image Gaussian-blurred with sigma = side / 8: the content without its detail)."""
    if kind == "black":
        return torch.full_like(images, -1.0)
    if kind == "blur":
        from torchvision.transforms.v2 import functional as TF

        return gaussian_blur(images, min(images.shape[-2:]) / 8.0, TF)
    raise ConfigError(f"IG baseline {kind!r}: choose one of {', '.join(BASELINES)}")


def gaussian_blur(images: torch.Tensor, sigma: float, tf=None) -> torch.Tensor:
    """torchvision's Gaussian blur with a 3-sigma odd kernel, reflect padding kept legal."""
    if tf is None:
        from torchvision.transforms.v2 import functional as tf
    side = min(images.shape[-2:])
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * side - 1)
    k -= 1 - k % 2
    return tf.gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])


def integrated_gradients(model, images: torch.Tensor, target: int | torch.Tensor | None = None,
                         baseline: str = "black", steps: int = 64,
                         internal_batch_size: int = 64) -> dict:
    """IG attributions (B, C, H, W) of the predicted class (or `target`) from a black / blurred
    baseline, Gauss-Legendre with `steps` points. "gap": |sum(attr) - (F(x) - F(x0))| per image,
    "relative_gap": that over |F(x) - F(x0)|, "target", "delta_f"."""
    from captum.attr import IntegratedGradients

    model.eval()
    base = baseline_for(images, baseline)
    with torch.no_grad():
        logits = model(images)
        if target is None:
            target = logits.argmax(dim=-1)
        target = torch.as_tensor(target).expand(len(images)).clone()
        rows = torch.arange(len(images))
        delta_f = (logits[rows, target] - model(base)[rows, target]).double()
    ig = IntegratedGradients(model)
    attr = ig.attribute(images, baselines=base, target=target, n_steps=steps,
                        internal_batch_size=max(1, internal_batch_size)).detach()
    gap = (attr.double().flatten(1).sum(dim=1) - delta_f).abs()
    return {"attributions": attr, "baseline": baseline, "target": target, "steps": steps,
            "delta_f": delta_f, "gap": gap, "relative_gap": gap / delta_f.abs().clamp_min(1e-12)}
