"""Attention probabilities on demand, mean attention distance and attention rollout.

`record_attention(model)` switches the model's attention layers to their explicit
softmax(QK^T / sqrt(d)) path for the duration of a `with` block and collects every layer's
probabilities; outside it the layers keep the fused SDPA kernel (and ViT blocks their fused CPU
inference layer), so training and plain inference never pay for materialised attention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vitscale.errors import ConfigError


@dataclass
class LayerGeometry:
    """Where one attention layer's tokens sit in the input image.

    ViT: `prefix` tokens without a position, then a `grid` of patch tokens `spacing` pixels apart.
    As-ViT: the stage's token `grid` (as the layer saw it, before window padding), cut into
    `window` sized windows; `spacing` pixels between neighbouring tokens."""

    name: str
    grid: tuple[int, int] = (0, 0)
    spacing: tuple[float, float] = (1.0, 1.0)
    prefix: int = 0
    window: tuple[int, int] | None = None


@dataclass
class Recording:
    """Per analysed layer: its geometry and the probabilities of each forward pass."""

    layers: list[LayerGeometry]
    probs: list[list[torch.Tensor]] = field(default_factory=list)

    def clear(self) -> None:
        for p in self.probs:
            p.clear()


def is_asvit(model) -> bool:
    from vitscale.models.asvit import AsViT

    return isinstance(model, AsViT)


def attention_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every encoder self-attention layer, input to output."""
    if is_asvit(model):
        return [(f"stages.{s}.{b}.attn", block.attn) for s, stage in enumerate(model.stages)
                for b, block in enumerate(stage)]
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") for b in blocks):
        raise ConfigError(f"{type(model).__name__} has no ViT / As-ViT encoder blocks to record "
                          "attention from; analyse a vitscale ViT or As-ViT checkpoint")
    return [(f"blocks.{i}.attn", block.attn) for i, block in enumerate(blocks)]


@contextlib.contextmanager
def record_attention(model, layers: Sequence[int] | None = None) -> Iterator[Recording]:
    """Inside the block, the chosen layers (indices into `attention_layers`, default all) run
    their explicit softmax path and append their probabilities to `Recording.probs[i]`
    (ViT: (B, heads, N, N); As-ViT: (B * windows, heads, n, n), windows batch-major)."""
    named = attention_layers(model)
    chosen = list(range(len(named))) if layers is None else [int(i) for i in layers]
    for i in chosen:
        if not 0 <= i < len(named):
            raise ConfigError(f"attention layer {i} does not exist; the model has {len(named)} "
                              f"(0..{len(named) - 1})")
    asvit = is_asvit(model)
    windowed = [i for i in chosen if not asvit and getattr(model.blocks[i], "window", 0)]
    if windowed:  # ViTDet-style windows: the recorded maps would be per window, not per image
        raise ConfigError(f"attention layer(s) {windowed} use window attention (window_size="
                          f"{model.blocks[windowed[0]].window}); analyse only the global blocks "
                          f"(layers=...), or load the model without window_size")
    geoms = [LayerGeometry(named[i][0]) for i in chosen]
    rec = Recording(geoms, [[] for _ in chosen])
    hooks = []
    stage_of = [int(name.split(".")[1]) for name, _ in named] if asvit else []

    def _vit_hook(_module, args):  # the image gives the patch grid and the pixel spacing
        h, w = args[0].shape[-2:]
        gh, gw = model._grid(h, w)
        for g in geoms:
            g.grid, g.spacing, g.prefix = (gh, gw), (h / gh, w / gw), model.num_prefix_tokens

    def _window_hook(geom: LayerGeometry, stage: int, module):
        def hook(_m, args):
            _, h, w, _ = args[0].shape
            step = model.tokenizer.stride * 2**stage
            geom.grid, geom.spacing = (h, w), (float(step), float(step))
            geom.window = (math.ceil(h / module.split), math.ceil(w / module.split))
        return hook

    try:
        if not asvit:
            hooks.append(model.register_forward_pre_hook(_vit_hook))
        for geom, i, probs in zip(geoms, chosen, rec.probs):
            module = named[i][1]
            if module.recorded is not None:
                raise ConfigError(f"{named[i][0]} is already being recorded; nest no "
                                  "record_attention blocks over the same layers")
            module.recorded = probs
            if asvit:
                hooks.append(module.register_forward_pre_hook(_window_hook(geom, stage_of[i], module)))
        yield rec
    finally:
        for h in hooks:
            h.remove()
        for i in chosen:
            named[i][1].recorded = None


# ---------------------------------------------------------------------------------- distance
def token_centres(grid: tuple[int, int], spacing: tuple[float, float]) -> torch.Tensor:
    """(gh * gw, 2) pixel centres (y, x) of a row-major token grid."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * spacing[0]
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * spacing[1]
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def mean_attention_distance(probs: torch.Tensor, centres: torch.Tensor,
                            query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per head: sum_k a_qk |c_q - c_k|, averaged over batch and (valid) queries.

    probs (B, heads, Nq, Nk) over positioned tokens only (each row renormalised to sum 1 here),
    centres (Nk, 2) with Nq == Nk; query_valid (B, Nq) bool selects the queries counted."""
    p = probs.double()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    dist = torch.cdist(centres, centres)  # (N, N)
    per_query = (p * dist).sum(dim=-1)  # (B, heads, Nq)
    if query_valid is None:
        return per_query.mean(dim=(0, 2))
    w = query_valid.to(p.dtype)[:, None, :]
    return (per_query * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1.0)


def layer_distance(probs: torch.Tensor, geom: LayerGeometry) -> torch.Tensor:
    """Mean attention distance in pixels per head of one layer's recorded probabilities:
    ViT over patch queries and keys (attention to prefix tokens, which have no position, left
    out and the rest renormalised); As-ViT within windows, padding queries left out."""
    if geom.window is None:
        p = geom.prefix
        return mean_attention_distance(probs[:, :, p:, p:], token_centres(geom.grid, geom.spacing))
    (h, w), (wh, ww) = geom.grid, geom.window
    nh, nw = math.ceil(h / wh), math.ceil(w / ww)
    rows = torch.arange(nh)[:, None, None, None] * wh + torch.arange(wh)[None, None, :, None]
    cols = torch.arange(nw)[None, :, None, None] * ww + torch.arange(ww)[None, None, None, :]
    valid = ((rows < h) & (cols < w)).reshape(nh * nw, wh * ww)
    valid = valid.repeat(probs.shape[0] // (nh * nw), 1)
    return mean_attention_distance(probs, token_centres((wh, ww), geom.spacing), valid)


@torch.no_grad()
def attention_distance(model, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean attention distance (pixels of the input) of every head of every layer, averaged over
    `images`: {"distance": [[per head] per layer], "layer_mean", "layers", "spearman"} with the
    Spearman correlation of the layer means against depth."""
    model.eval()
    sums: list[torch.Tensor] | None = None
    with record_attention(model) as rec:
        for chunk in images.split(batch_size):
            rec.clear()
            model(chunk)
            d = [layer_distance(p[0], g) * len(chunk) for p, g in zip(rec.probs, rec.layers)]
            sums = d if sums is None else [a + b for a, b in zip(sums, d)]
        geoms = rec.layers
    per_layer = [(s / len(images)).tolist() for s in sums]
    means = [sum(d) / len(d) for d in per_layer]
    return {"distance": per_layer, "layer_mean": means, "layers": [g.name for g in geoms],
            "spearman": spearman(list(range(len(means))), means), "units": "pixels",
            "img_size": list(images.shape[-2:]), "images": len(images)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 points or a constant series)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------- rollout
def rollout(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's attention rollout of layers' (B, heads, N, N) probabilities: per layer
    the head mean plus the identity (the residual), each row renormalised to sum 1, multiplied
    from the first layer up: R = A_L ... A_1. Rows of R sum to 1."""
    out = None
    for p in probs:
        a = p.double().mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        out = a if out is None else a @ out
    return out


@torch.no_grad()
def attention_rollout(model, images: torch.Tensor, variant: str = "auto") -> dict:
    """Rollout of a ViT over `images`: {"rollout": (B, N, N), "maps": (B, gh, gw), "variant",
    "logits"}.
    variant "cls": the class token's row over the patches; "gap": the mean of the patch tokens'
    rows (what a GAP / MAP head pools); "auto": cls for a class-token head, else gap."""
    if is_asvit(model):
        raise ConfigError("attention rollout needs one token sequence through every layer; an "
                          "As-ViT's window attention changes the grid per stage (analyse "
                          "distance instead)")
    if variant not in ("auto", "cls", "gap"):
        raise ConfigError(f"rollout variant {variant!r}: choose auto, cls or gap")
    has_cls = model.cls_token is not None
    if variant == "auto":
        variant = "cls" if model.cfg.pool == "token" and has_cls else "gap"
    if variant == "cls" and not has_cls:
        raise ConfigError("the cls rollout needs a class token; this model has none (use gap)")
    model.eval()
    with record_attention(model) as rec:
        logits = model(images)
        geom = rec.layers[0]
        r = rollout([p[0] for p in rec.probs])
    p = geom.prefix
    flow = r[:, 0, p:] if variant == "cls" else r[:, p:, p:].mean(dim=1)
    return {"rollout": r, "maps": flow.reshape(-1, *geom.grid), "variant": variant,
            "logits": logits}
