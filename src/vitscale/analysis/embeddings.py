"""What the embeddings learned: principal components of the patch-embedding filters and the
cosine similarity of position embeddings on the patch grid (the ViT paper's Figure 7, left and
centre)."""

from __future__ import annotations

import torch

from vitscale.analysis.attention import is_asvit
from vitscale.errors import ConfigError


def patch_kernels(model) -> torch.Tensor:
    """The first layer's convolution kernels (D, C, kh, kw): a ViT's patch projection or an
    As-ViT's tokenizer. A hybrid's patch projection acts on ResNet features, not pixels."""
    if is_asvit(model):
        return model.tokenizer.proj.weight.detach()
    if getattr(model.cfg, "stem", "patch") == "hybrid":
        raise ConfigError("a hybrid's patch embedding sees ResNet features, not pixels: it has no "
                          "image-space filters to analyse (skip filters)")
    return model.patch_embed.proj.weight.detach()


def filter_components(kernels: torch.Tensor, k: int = 28) -> dict:
    """Top-`k` principal components of the kernels, each flattened to one row and the rows
    centred: {"components": (k, C, kh, kw), "explained": (k,) variance fractions,
    "singular_values": (k,)}."""
    d = kernels.shape[0]
    x = kernels.double().reshape(d, -1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vh.shape[0])
    var = s**2
    return {"components": vh[:k].reshape(k, *kernels.shape[1:]), "explained": var[:k] / var.sum(),
            "singular_values": s[:k]}


def position_table(model) -> tuple[torch.Tensor, tuple[int, int], str]:
    """(N, D) position embeddings of the patch grid, the grid, and "learned" or "fixed sin-cos"."""
    if is_asvit(model):
        raise ConfigError("an As-ViT has no position embedding (its overlapping convolutions "
                          "give position); skip posemb")
    cfg = model.cfg
    if cfg.posemb == "learn":
        return model.pos_embed.detach()[0, cfg.posemb_prefix_rows:], cfg.grid_size, "learned"
    if cfg.posemb == "sincos2d":
        return model.pos_embed_fixed.detach()[0], cfg.grid_size, "fixed sin-cos"
    raise ConfigError(f"the model has no position embedding (posemb={cfg.posemb}); skip posemb")


def posemb_similarity(table: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity of every position's embedding with every other's."""
    t = table.double()
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return t @ t.T
