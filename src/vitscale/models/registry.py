"""Named sizes from the papers and `create_model("B/16", ...)`.

Width / depth / MLP / heads are as published: ViT (Dosovitskiy et al., Table 1), Scaling ViT
(Zhai et al., Table 2: Ti..G, and ViT-e from PaLI) and ViT-22B (Dehghani et al., Table 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vitscale.errors import ConfigError
from vitscale.models.config import ModelConfig


@dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp_dim: int
    heads: int
    defaults: dict[str, Any] = field(default_factory=dict)  # switches that come with the size
    paper: str = ""


# ViT-22B drops the QKV and LayerNorm biases, uses parallel blocks, QK LayerNorm and a MAP head.
_VIT22B = dict(block="parallel", qk_norm=True, qkv_bias=False, norm_bias=False, pool="map")

SIZES: dict[str, Size] = {
    "Ti": Size(192, 12, 768, 3, paper="AugReg / Scaling ViT"),
    "S": Size(384, 12, 1536, 6, paper="AugReg / Scaling ViT"),
    "M": Size(512, 12, 2048, 8, paper="Scaling ViT"),
    "B": Size(768, 12, 3072, 12, paper="ViT"),
    "L": Size(1024, 24, 4096, 16, paper="ViT"),
    "H": Size(1280, 32, 5120, 16, paper="ViT"),
    "g": Size(1408, 40, 6144, 16, paper="Scaling ViT"),
    "G": Size(1664, 48, 8192, 16, paper="Scaling ViT"),
    "e": Size(1792, 56, 15360, 16, paper="PaLI (ViT-e)"),
    "22B": Size(6144, 48, 24576, 48, defaults=_VIT22B, paper="ViT-22B"),
}

# BiT ResNet stages of the ViT paper's hybrids, by total stride. For /16 the paper drops
# ResNet-50's stage 4 and extends stage 3 to 9 blocks; for /32 it keeps all four stages.
HYBRID_LAYERS: dict[str, dict[int, tuple[int, ...]]] = {
    "R26": {32: (2, 2, 2, 2)},
    "R50": {16: (3, 4, 9), 32: (3, 4, 6, 3)},
}

# The default resolution each family is usually shown at (for `vitscale models`).
DEFAULT_PATCH = {"Ti": 16, "S": 16, "M": 16, "B": 16, "L": 16, "H": 14, "g": 14, "G": 14,
                 "e": 14, "22B": 14}

_NAME = re.compile(r"^(?:(?P<hybrid>R\w+)\+)?(?P<size>[A-Za-z0-9]+)/(?P<ph>\d+)(?:x(?P<pw>\d+))?$")


def parse_name(name: str) -> tuple[str | None, str, tuple[int, int]]:
    """'R50+B/16' -> ('R50', 'B', (16, 16)); 'S/16x8' -> (None, 'S', (16, 8))."""
    m = _NAME.match(name.strip())
    if not m or m.group("size") not in SIZES:
        raise ConfigError(
            f"unknown model name {name!r}; use SIZE/PATCH with SIZE one of {list(SIZES)} "
            f"(e.g. 'B/16', 'S/32', 'g/14', '22B/14'), optionally a hybrid prefix "
            f"{list(HYBRID_LAYERS)} as in 'R50+B/16'"
        )
    hybrid = m.group("hybrid")
    if hybrid is not None and hybrid not in HYBRID_LAYERS:
        raise ConfigError(f"unknown hybrid stem {hybrid!r} in {name!r}; choose one of {list(HYBRID_LAYERS)}")
    ph = int(m.group("ph"))
    pw = int(m.group("pw")) if m.group("pw") else ph
    return hybrid, m.group("size"), (ph, pw)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a named size, with any field overridden."""
    hybrid, size_name, patch = parse_name(name)
    size = SIZES[size_name]
    base: dict[str, Any] = dict(
        name=name, width=size.width, depth=size.depth, mlp_dim=size.mlp_dim, heads=size.heads,
        patch=patch,
    )
    base.update(size.defaults)
    if hybrid is not None:
        by_stride = HYBRID_LAYERS[hybrid]
        if patch[0] != patch[1] or patch[0] not in by_stride:
            raise ConfigError(
                f"hybrid {hybrid} supports patch sizes {sorted(by_stride)}, got {name!r}"
            )
        base.update(stem="hybrid", hybrid_layers=by_stride[patch[0]])
    if "pool" in overrides and "class_token" not in overrides:
        base.pop("class_token", None)
    base.update(overrides)
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; valid options are {sorted(known)}")
    return ModelConfig(**base)


def is_asvit(name: str) -> bool:
    return name.startswith("asvit")


def any_config(name: str, **overrides: Any):
    """The config of a named ViT size ("B/16") or As-ViT ("asvit-large", "asvit:K,S,E|...")."""
    if is_asvit(name):
        from vitscale.models.asvit import asvit_config

        return asvit_config(name.removeprefix("asvit:"), **overrides)
    return model_config(name, **overrides)


def build(cfg):
    """The module a config describes: a VisionTransformer or an As-ViT."""
    from vitscale.models.asvit import AsViT, AsViTConfig
    from vitscale.models.vit import VisionTransformer

    return AsViT(cfg) if isinstance(cfg, AsViTConfig) else VisionTransformer(cfg)


def create_model(name_or_cfg: Any, **overrides: Any):
    """Build a model: `create_model("B/16", num_classes=1000, img_size=224, pool="gap")`,
    `create_model("asvit-large")`, or from a ModelConfig / AsViTConfig."""
    if isinstance(name_or_cfg, str):
        return build(any_config(name_or_cfg, **overrides))
    return build(name_or_cfg.replace(**overrides) if overrides else name_or_cfg)


def list_models(patch: int | None = None) -> list[str]:
    """Named configurations shown by `vitscale models`: every size at its usual patch, plus the
    common AugReg / ViT-paper variants and the hybrids."""
    names = [f"{s}/{patch or DEFAULT_PATCH[s]}" for s in SIZES]
    if patch is None:
        names += ["Ti/16", "S/32", "B/32", "B/8", "L/32", "R26+S/32", "R50+B/16"]
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]
