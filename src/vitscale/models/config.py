"""`ModelConfig`: one dataclass whose switches describe every ViT variant of the four papers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vitscale.errors import ConfigError

POOLS = ("token", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d", "none")
POSEMB_INITS = ("normal", "sincos2d")
BLOCKS = ("sequential", "parallel")
STEMS = ("patch", "hybrid")
ACTS = ("gelu", "gelu_tanh")
GAP_NORMS = ("tokens", "pooled")
RESAMPLE_MODES = ("bicubic", "bilinear")


# extra[...] of a config whose img_size is a guess (a big_vision sin-cos .npz records none): the
# model is built there, and a timm export, whose pos_embed is a table for one grid, is refused.
IMG_SIZE_ASSUMED = "img_size_assumed"


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) from an int or a 2-sequence."""
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


@dataclass
class ModelConfig:
    """Architecture of a Vision Transformer.

    Defaults are the ViT paper's B/16 at 224 px with a class token and learned position
    embeddings. Named sizes (`registry.SIZES`) and `create_model` fill these in.
    """

    name: str = "custom"
    # Geometry.
    img_size: int | tuple[int, int] = 224
    patch: int | tuple[int, int] = 16
    in_chans: int = 3
    num_classes: int = 1000
    # Encoder size.
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    # Tokens and position embeddings.
    class_token: bool | None = None  # None: True exactly when pool == "token"
    posemb: str = "learn"
    posemb_include_cls: bool = True  # learned posemb has a row for the class token (ViT / timm)
    posemb_init_std: float = 0.02
    # Learned posemb start: "normal" N(0, posemb_init_std) (ViT, timm) or "sincos2d" (the fixed
    # table's values, class-token row zero), a smooth table that resamples to other grids well.
    posemb_init: str = "normal"
    # sincos2d: measure positions in this grid's units (set when weights move to another grid,
    # so patches keep the positions they had in training); None: the model's own grid.
    posemb_ref_grid: tuple[int, int] | None = None
    # sincos2d: integer positions on every input's own grid, whatever img_size the model was built
    # at (big_vision, whose files record no trained grid); False keeps the built grid's geometry.
    posemb_input_grid: bool = False
    # Encoder block.
    block: str = "sequential"
    qk_norm: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    norm_eps: float = 1e-6
    act: str = "gelu"
    # Regularization.
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # rate of the last block; linearly increasing from 0 with depth
    # Head.
    pool: str = "token"
    gap_norm: str = "tokens"  # "tokens": LN every token then pool (big_vision); "pooled": timm
    map_mlp_dim: int | None = None  # None: mlp_dim
    head_hidden: int | None = None  # pre-logits Dense + tanh (original ViT pre-training head)
    head_zero_init: bool = False
    head_bias_init: float = 0.0
    # DeiT's distillation token: a second prefix token (after the class token, with its own
    # position-embedding row) read by a second classifier `head_dist`; the model's logits are the
    # mean of the two heads' (vitscale distill, distill.mode=token, trains each on its target).
    dist_token: bool = False
    # Stem.
    stem: str = "patch"
    hybrid_layers: tuple[int, ...] = (3, 4, 9)  # BiT ResNet blocks per stage
    hybrid_width: int = 64  # stem channels; stage s has width * 2**s bottleneck channels
    hybrid_ws_eps: float = 1e-8  # weight-standardization epsilon (timm's R+ViT hybrids)
    # Position-embedding resampling when weights come from another grid.
    resample_mode: str = "bicubic"
    resample_antialias: bool = True
    resample_align_corners: bool = False  # True + bilinear + no antialias = big_vision's zoom
    dynamic_img_size: bool = False  # resample learned posemb on the fly for other input sizes
    # Pad inputs whose size is not a multiple of the patch (zeros at the bottom / right) instead
    # of refusing them; the tokens of the padded grid are all kept.
    dynamic_img_pad: bool = False
    # Window attention (ViTDet): with window_size > 0, every block not listed in global_blocks
    # attends inside non-overlapping window_size x window_size windows of the patch grid (the
    # grid zero-padded to a multiple of the window; prefix tokens attend among themselves
    # there); 0: every block global.
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (source, tags)

    def __post_init__(self) -> None:
        self.img_size = pair(self.img_size)
        self.patch = pair(self.patch)
        self.hybrid_layers = tuple(int(v) for v in self.hybrid_layers)
        self.global_blocks = tuple(sorted({int(v) for v in self.global_blocks}))
        if self.posemb_ref_grid is not None:
            self.posemb_ref_grid = pair(self.posemb_ref_grid)
            if self.posemb_ref_grid == self.grid_size:
                self.posemb_ref_grid = None  # the same thing, said one way
        if self.class_token is None:
            self.class_token = self.pool == "token"
        self.validate()

    # ------------------------------------------------------------------ derived geometry
    @property
    def stem_stride(self) -> int:
        """Downsampling of the hybrid ResNet before the patch projection (1 for plain ViT)."""
        if self.stem != "hybrid":
            return 1
        # Root conv stride 2 + max-pool stride 2, then stride 2 for every stage after the first.
        return 4 * 2 ** max(len(self.hybrid_layers) - 1, 0)

    @property
    def embed_patch(self) -> tuple[int, int]:
        """Kernel/stride of the projection conv on its input (image or ResNet features)."""
        s = self.stem_stride
        return (self.patch[0] // s, self.patch[1] // s)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch[0], self.img_size[1] // self.patch[1])

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        return (1 if self.class_token else 0) + (1 if self.dist_token else 0)

    @property
    def posemb_prefix_rows(self) -> int:
        """Rows of a learned position embedding for the prefix tokens (before the grid's)."""
        return self.num_prefix_tokens if self.class_token and self.posemb_include_cls else 0

    @property
    def seq_len(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        choices = {
            "pool": (self.pool, POOLS),
            "posemb": (self.posemb, POSEMBS),
            "posemb_init": (self.posemb_init, POSEMB_INITS),
            "block": (self.block, BLOCKS),
            "stem": (self.stem, STEMS),
            "act": (self.act, ACTS),
            "gap_norm": (self.gap_norm, GAP_NORMS),
            "resample_mode": (self.resample_mode, RESAMPLE_MODES),
        }
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ConfigError(f"model.{key}={value!r} is not valid; choose one of {valid}")
        for key in ("width", "depth", "mlp_dim", "heads", "in_chans"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0 (0: no head), got {self.num_classes}")
        if self.width % self.heads:
            raise ConfigError(
                f"model.width={self.width} is not divisible by model.heads={self.heads}; "
                f"pick heads from {[h for h in range(1, self.width + 1) if self.width % h == 0][:12]}"
            )
        for name, rate in (("dropout", self.dropout), ("attn_dropout", self.attn_dropout),
                           ("drop_path", self.drop_path)):
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"model.{name}={rate} must be in [0, 1)")
        if self.stem == "hybrid":
            s = self.stem_stride
            if self.patch[0] % s or self.patch[1] % s:
                raise ConfigError(
                    f"model.patch={self.patch} must be a multiple of the hybrid ResNet stride {s} "
                    f"(hybrid_layers={self.hybrid_layers})"
                )
        for axis, (size, p) in enumerate(zip(self.img_size, self.patch)):
            if p < 1 or size % p:
                side = "height" if axis == 0 else "width"
                raise ConfigError(
                    f"image {side} {size} is not divisible by patch {p}; use an img_size that is a "
                    f"multiple of the patch size (e.g. {max(p, size // p * p)})"
                )
        if self.posemb_ref_grid is not None and (
                self.posemb != "sincos2d" or min(self.posemb_ref_grid) < 1):
            raise ConfigError(f"model.posemb_ref_grid={self.posemb_ref_grid} needs "
                              "posemb='sincos2d' and a positive grid; remove it")
        if self.posemb_input_grid and (self.posemb != "sincos2d" or self.posemb_ref_grid):
            raise ConfigError("model.posemb_input_grid=true needs posemb='sincos2d' and no "
                              "posemb_ref_grid; set posemb_input_grid=false or drop the other")
        if "sincos2d" in (self.posemb, self.posemb_init) and self.width % 4:
            raise ConfigError(f"model.posemb='sincos2d' and model.posemb_init='sincos2d' need a "
                              f"width divisible by 4, got {self.width}")
        if self.pool == "token" and not self.class_token:
            raise ConfigError("model.pool='token' needs model.class_token=true")
        if self.dist_token and (self.pool != "token" or self.head_hidden or self.num_classes < 1):
            raise ConfigError("model.dist_token=true (DeiT) needs pool='token', no head_hidden and "
                              "a classifier (num_classes >= 1)")
        if self.window_size < 0:
            raise ConfigError(f"model.window_size={self.window_size} must be >= 0 (0: global "
                              "attention in every block)")
        bad = [b for b in self.global_blocks if not 0 <= b < self.depth]
        if bad:
            raise ConfigError(f"model.global_blocks {bad} are not blocks of a depth-{self.depth} "
                              f"model; use indices 0..{self.depth - 1}")
        if self.qk_norm and self.head_dim < 1:
            raise ConfigError("model.qk_norm needs a head dimension >= 1")

    # ------------------------------------------------------------------ (de)serialisation
    def windowed(self, block: int) -> bool:
        """Whether block `block` attends inside windows (window_size > 0 and not global)."""
        return self.window_size > 0 and block not in self.global_blocks

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("img_size", "patch", "hybrid_layers", "posemb_ref_grid", "global_blocks"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **overrides: Any) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; valid options are {sorted(known)}")
        if "pool" in overrides and "class_token" not in overrides:
            overrides["class_token"] = None  # re-derive from the new pool
        return dataclasses.replace(self, **overrides)
