"""big_vision / google-research ViT `.npz` checkpoints in and out.

Two key layouts exist (shared/research/big_vision.md, section 5):

* "augreg" (vit_jax: the original ViT and AugReg releases): pre-Linen module numbers inside a
  block (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) and a learned
  posemb at `Transformer/posembed_input/pos_embedding` whose row 0 belongs to the class token
  (the posemb is added after the class token is concatenated).
* "big_vision" (models/vit.py): per-type numbers (MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0), a top-level `pos_embedding` without a class-token row (added before cls is
  concatenated), an optional `MAPHead_0`, and scan checkpoints that stack every block under
  `Transformer/encoderblock/` along a leading depth axis.

Reading brings every file to the big_vision names first (prefix stripped, pre-Linen numbers
renumbered per module type, legacy posemb / MAP locations moved, scan stacks split) and then maps
those to vitscale names: conv kernels HWIO -> OIHW, Dense kernels (in, out) -> (out, in),
attention kernels (D, H, d) -> (H*d, D) with query, key and value fused into `attn.qkv`. bf16
arrays, which numpy stores as 2-byte voids ('V2'), come back as torch.bfloat16.

The files hold no activation or LayerNorm epsilon, so the config gets Flax's defaults (tanh GELU,
eps 1e-6); with them our forward pass reproduces the JAX models.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscale.errors import CheckpointError, ConfigError
from vitscale.models.config import IMG_SIZE_ASSUMED, ModelConfig, pair
from vitscale.utils.io import atomic_write

LAYOUTS = ("augreg", "big_vision")
# Where the parameter tree sits: bare (releases), flax.optim checkpoints, big_vision checkpoints
# with optimizer state, and the image tower of LiT / SigLIP two-tower files.
PREFIXES = ("", "opt/target/", "params/", "params/img/", "img/")

_VITJAX_POSEMB = "Transformer/posembed_input/pos_embedding"
_OLD_BV_POSEMB = "Transformer/pos_embedding"  # big_vision before 2022 kept it in the encoder
_BLOCK = "Transformer/encoderblock_{}/"
_SCAN = "Transformer/encoderblock/"
_MHA = "MultiHeadDotProductAttention_0"
_MAP = "MAPHead_0/"
_GROUPNORMS = {"gn_root", "gn_proj", "gn1", "gn2", "gn3"}
_NUMBERED = re.compile(r"^(.+)_(\d+)$")
_BLOCK_KEY = re.compile(r"^Transformer/encoderblock_(\d+)/")
_UNIT_KEY = re.compile(r"^block(\d+)/unit(\d+)/")
# Block children: big_vision (per-type numbering) -> vit_jax (pre-Linen global numbering).
_TO_AUGREG = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


# ---------------------------------------------------------------------------------- files
def is_npz(path: str | Path) -> bool:
    """True for an existing zip archive whose members are all `.npy` arrays."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not an .npz archive ({_reason(exc)}); pass a big_vision / AugReg .npz file"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(
            f"{path} holds a single .npy array, not an .npz of named parameters; pass the "
            "checkpoint's .npz file"
        )
    try:
        with data:
            return {name: data[name] for name in data.files}
    except Exception as exc:
        raise CheckpointError(
            f"{path} is a corrupt .npz archive ({_reason(exc)}); download it again"
        ) from None


def _to_torch(key: str, array: np.ndarray, path: Path) -> torch.Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        # numpy has no bfloat16, so big_vision saves bf16 as raw 2-byte voids: reinterpret the bits.
        bits = np.ascontiguousarray(array).view(np.int16).copy()
        return torch.from_numpy(bits).view(torch.bfloat16)
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{path}: parameter {key!r} has dtype {array.dtype}, expected floating point; is this a "
            "ViT parameter checkpoint?"
        )
    return torch.from_numpy(np.array(array, copy=True))


# ---------------------------------------------------------------------------------- legacy fixes
def _strip_prefix(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, dict[str, np.ndarray]]:
    for prefix in PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    shown = ", ".join(sorted(arrays)[:4]) or "none"
    raise CheckpointError(
        f"{path} has no ViT parameters (no 'embedding/kernel' under any of the prefixes "
        f"{[p or '(none)' for p in PREFIXES]}; first keys: {shown}); pass a ViT / AugReg / "
        "big_vision checkpoint"
    )


def _squeeze_groupnorm(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Old Flax stored GroupNorm scale / bias with leading singleton dims, e.g. (1, 1, 1, C).
    return {k: v.reshape(-1) if _GROUPNORMS & set(k.split("/")) else v for k, v in params.items()}


def _renumber_pre_linen(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flax's `convert_pre_linen`: pre-Linen numbered all children of a module in one sequence
    (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); Linen numbers each
    module type on its own. Renumber every `Type_N` among its siblings in order from 0."""
    numbers: dict[tuple[str, str], set[int]] = {}
    for key in params:
        parts = key.split("/")
        for depth, part in enumerate(parts[:-1]):
            m = _NUMBERED.match(part)
            if m:
                numbers.setdefault(("/".join(parts[:depth]), m.group(1)), set()).add(int(m.group(2)))
    rename = {
        (parent, f"{kind}_{n}"): f"{kind}_{i}"
        for (parent, kind), found in numbers.items()
        for i, n in enumerate(sorted(found))
    }
    out = {}
    for key, value in params.items():
        parts = key.split("/")
        new = [rename.get(("/".join(parts[:d]), p), p) for d, p in enumerate(parts[:-1])]
        out["/".join(new + parts[-1:])] = value
    return out


def _nest_inlined_map(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # MAP-head variants from ViT-G development kept the head's modules at the top level.
    if "probe" not in params:
        return params
    moved = ("probe", "MlpBlock_0", _MHA, "LayerNorm_0")
    return {
        (_MAP + k if k.split("/")[0] in moved else k): v for k, v in params.items()
    }


def _unstack_scan(params: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    stacked = [k for k in params if k.startswith(_SCAN)]
    if not stacked:
        return params
    if any(_BLOCK_KEY.match(k) for k in params):
        raise CheckpointError(
            f"{path} mixes scan-stacked (Transformer/encoderblock/) and per-block "
            "(Transformer/encoderblock_N/) parameters; re-export it with one of the two"
        )
    depth = params[stacked[0]].shape[0]
    out = {k: v for k, v in params.items() if not k.startswith(_SCAN)}
    for key in stacked:
        value = params[key]
        if value.ndim == 0 or value.shape[0] != depth:
            raise CheckpointError(
                f"{path}: scan-stacked {key!r} has shape {tuple(value.shape)}, expected a leading "
                f"depth axis of {depth} like the other blocks; the file is inconsistent"
            )
        rest = key[len(_SCAN):]
        for i in range(depth):
            out[_BLOCK.format(i) + rest] = value[i].clone()  # own storage, not a view of the stack
    return out


# ---------------------------------------------------------------------------------- reading
class _Reader:
    """Pops big_vision-named tensors and stores them under vitscale names."""

    def __init__(self, params: dict[str, torch.Tensor], path: Path) -> None:
        self.params = params
        self.path = path
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.params:
            raise CheckpointError(
                f"{self.path} is missing {key!r}; the file is truncated or not a plain ViT checkpoint"
            )
        return self.params.pop(key)

    def maybe(self, key: str) -> torch.Tensor | None:
        return self.params.pop(key, None)

    def conv(self, src: str, dst: str, bias: bool = False) -> None:
        self.out[f"{dst}.weight"] = self.take(f"{src}/kernel").permute(3, 2, 0, 1)  # HWIO -> OIHW
        if bias:
            self.out[f"{dst}.bias"] = self.take(f"{src}/bias")

    def dense(self, src: str, dst: str) -> None:
        self.out[f"{dst}.weight"] = self.take(f"{src}/kernel").T
        b = self.maybe(f"{src}/bias")
        if b is not None:
            self.out[f"{dst}.bias"] = b

    def norm(self, src: str, dst: str) -> None:
        self.out[f"{dst}.weight"] = self.take(f"{src}/scale")
        b = self.maybe(f"{src}/bias")
        if b is not None:
            self.out[f"{dst}.bias"] = b

    def heads_in(self, src: str, names: tuple[str, ...], dst: str) -> None:
        """(D, H, d) kernels -> one (len(names)*H*d, D) Linear, rows in `names` order."""
        kernels = [self.take(f"{src}/{n}/kernel") for n in names]
        self.out[f"{dst}.weight"] = torch.cat([k.reshape(k.shape[0], -1).T for k in kernels])
        biases = [self.maybe(f"{src}/{n}/bias") for n in names]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise CheckpointError(
                    f"{self.path}: {src} has biases for only some of {names}; the file is inconsistent"
                )
            self.out[f"{dst}.bias"] = torch.cat([b.reshape(-1) for b in biases])

    def heads_out(self, src: str, dst: str) -> None:
        k = self.take(f"{src}/out/kernel")  # (H, d, D)
        self.out[f"{dst}.weight"] = k.reshape(-1, k.shape[-1]).T
        b = self.maybe(f"{src}/out/bias")
        if b is not None:
            self.out[f"{dst}.bias"] = b

    def mlp(self, src: str, dst: str) -> None:
        self.dense(f"{src}/Dense_0", f"{dst}.fc1")
        self.dense(f"{src}/Dense_1", f"{dst}.fc2")


def read_npz(path: str | Path, img_size: Any = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in vitscale names) of a big_vision / AugReg / original-ViT `.npz`.

    Accepts the vit_jax and big_vision layouts, the prefixes in `PREFIXES`, pre-Linen module
    numbers, scan-stacked blocks, bf16 stored as 'V2' and the R+ViT hybrids. The config is read
    off the array shapes. A learned posemb records only its row count: it is read on the patch
    grid of `img_size` when that grid has as many cells (a class-token row aside), as big_vision's
    loader, which compares shapes only, takes it; otherwise on the square grid the count makes
    (the only shape the rows tell). A sin-cos file records no size: it is built at `img_size`, or
    at an assumed 224 px, and computes its positions on each input's own grid either way.
    """
    path = Path(path)
    arrays = _load_arrays(path)
    prefix, arrays = _strip_prefix(arrays, path)
    params = {k: _to_torch(prefix + k, v, path) for k, v in arrays.items()}
    # vit_jax files keep the posemb inside the encoder and use pre-Linen numbers; note the layout
    # before the fixes below rename things.
    augreg = _VITJAX_POSEMB in params or (
        "pos_embedding" not in params and _OLD_BV_POSEMB not in params
        and any("MultiHeadDotProductAttention_1" in k for k in params)
    )
    layout = "augreg" if augreg else "big_vision"
    params = _squeeze_groupnorm(params)
    params = _renumber_pre_linen(params)
    params = _nest_inlined_map(params)
    params = _unstack_scan(params, path)
    posemb = None
    for key in (_VITJAX_POSEMB, _OLD_BV_POSEMB, "pos_embedding"):
        if key in params:
            posemb = params.pop(key)
            break
    cfg = _infer_config(params, posemb, layout, path, img_size)
    sd = _to_state_dict(params, posemb, cfg, layout, path)
    return cfg, sd


def _square_reading(rows: int, has_cls: bool) -> tuple[int, bool] | None:
    """(side, class-token row?) of the square grid a table of `rows` rows is read as, if any."""
    for cls_row in (False, True) if has_cls else (False,):
        side = math.isqrt(rows - cls_row)
        if side * side == rows - cls_row:
            return side, cls_row
    return None


def _posemb_grid(rows: int, has_cls: bool, layout: str, patch: tuple[int, int], img_size: Any,
                 path: Path) -> tuple[tuple[int, int], bool]:
    """(patch grid, class-token row?) of a learned table: `img_size`'s grid when its cells fit the
    rows, else the square grid they make, else a one-line error naming the img_size to pass."""
    want = None
    if img_size is not None:
        img_size = pair(img_size)
        want = (img_size[0] // patch[0], img_size[1] // patch[1])
        for cls_row in (False, True) if has_cls else (False,):
            if want[0] * want[1] == rows - cls_row:
                return want, cls_row
    square = _square_reading(rows, has_cls)
    if square is not None:
        return (square[0], square[0]), square[1]
    cells = rows - 1 if has_cls and layout == "augreg" else rows  # vit_jax gives cls a row
    h = max(d for d in range(1, math.isqrt(cells) + 1) if cells % d == 0)
    w = cells // h
    given = (f" and does not fit img_size {img_size} ({want[0]}x{want[1]} patches)"
             if want else "")
    raise CheckpointError(
        f"{path}: pos_embedding has {rows} rows, which is not a square patch grid{given}; pass the "
        f"img_size it was trained at, e.g. img_size=({h * patch[0]}, {w * patch[1]}) or "
        f"({w * patch[0]}, {h * patch[1]}) (vitscale convert: --set "
        f"img_size=[{h * patch[0]},{w * patch[1]}])"
    )


def _infer_config(params: dict[str, torch.Tensor], posemb: torch.Tensor | None, layout: str,
                  path: Path, img_size: Any = None) -> ModelConfig:
    embed = params["embedding/kernel"]
    if embed.ndim != 4:
        raise CheckpointError(
            f"{path}: embedding/kernel has shape {tuple(embed.shape)}; only the conv patch "
            "embedding (P, P, C, D) is supported, not a Dense one over flattened patches (NaFlex)"
        )
    kh, kw, chans, width = embed.shape
    blocks = sorted({int(m.group(1)) for k in params if (m := _BLOCK_KEY.match(k))})
    if not blocks:
        raise CheckpointError(
            f"{path} has an embedding but no Transformer/encoderblock_N parameters; pass a full ViT "
            "checkpoint, not an embedding or head export"
        )
    if blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{path}: encoder blocks {blocks} are not numbered 0..N-1; the file is incomplete"
        )
    first = _BLOCK.format(0)
    query = params.get(f"{first}{_MHA}/query/kernel")
    if query is None or query.ndim != 3:
        raise CheckpointError(
            f"{path}: block 0 has no (D, heads, head_dim) attention query kernel; only plain "
            "pre-LN ViT blocks (LayerNorm, MultiHeadDotProductAttention, MlpBlock) are supported"
        )
    heads, head_dim = query.shape[1], query.shape[2]
    if heads * head_dim != width:
        raise CheckpointError(
            f"{path}: attention has {heads} heads of {head_dim} dims but the width is {width}; "
            "vitscale needs heads * head_dim == width"
        )
    has_cls = "cls" in params
    cfg: dict[str, Any] = dict(
        name=path.stem,
        in_chans=int(chans),
        width=int(width),
        depth=len(blocks),
        heads=int(heads),
        mlp_dim=int(params[f"{first}MlpBlock_0/Dense_0/kernel"].shape[1]),
        class_token=has_cls,
        qkv_bias=f"{first}{_MHA}/query/bias" in params,
        proj_bias=f"{first}{_MHA}/out/bias" in params,
        mlp_bias=f"{first}MlpBlock_0/Dense_0/bias" in params,
        norm_bias=f"{first}LayerNorm_0/bias" in params,
        # Flax defaults; the file does not record them.
        act="gelu_tanh",
        norm_eps=1e-6,
        posemb_init_std=0.02 if layout == "augreg" else width**-0.5,
        gap_norm="tokens",  # both codebases apply encoder_norm to every token before pooling
        num_classes=int(params["head/kernel"].shape[1]) if "head/kernel" in params else 0,
        head_hidden=int(params["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in params else None,
        extra={"source": "npz", "layout": layout},
    )
    if f"{_MAP}probe" in params:
        cfg["pool"] = "map"
        map_mlp = int(params[f"{_MAP}MlpBlock_0/Dense_0/kernel"].shape[1])
        cfg["map_mlp_dim"] = None if map_mlp == cfg["mlp_dim"] else map_mlp
    else:
        cfg["pool"] = "token" if has_cls else "gap"

    stride = 1
    if "conv_root/kernel" in params:
        root = params["conv_root/kernel"]
        units: dict[int, set[int]] = {}
        for key in params:
            if m := _UNIT_KEY.match(key):
                units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        stages = sorted(units)
        if stages != list(range(1, len(stages) + 1)) or any(
                sorted(u) != list(range(1, len(u) + 1)) for u in units.values()):
            raise CheckpointError(
                f"{path}: hybrid ResNet stages/units {dict(sorted(units.items()))} are not numbered "
                "1..N; the file is incomplete"
            )
        layers = tuple(len(units[s]) for s in stages)
        cfg.update(stem="hybrid", hybrid_layers=layers, hybrid_width=int(root.shape[-1]),
                   in_chans=int(root.shape[2]))
        # Root conv + max-pool give stride 4, every stage after the first halves again.
        stride = 4 * 2 ** max(len(layers) - 1, 0)
    patch = (int(kh) * stride, int(kw) * stride)
    cfg["patch"] = patch

    if posemb is None:
        # big_vision's sincos2d posemb is not a parameter and computes integer positions on each
        # input's grid; no trained grid is stored. Build at img_size, else at 224 px (noted).
        cfg.update(posemb="sincos2d", posemb_input_grid=True, posemb_include_cls=False)
        if img_size is None:
            cfg["img_size"] = tuple(max(p, 224 // p * p) for p in patch)
            cfg["extra"][IMG_SIZE_ASSUMED] = True
        else:
            cfg["img_size"] = img_size
    else:
        grid, cls_row = _posemb_grid(posemb.shape[-2], has_cls, layout, patch, img_size, path)
        cfg["posemb"] = "learn"
        cfg["img_size"] = (grid[0] * patch[0], grid[1] * patch[1])
        # A big_vision file with a class-token row gets it folded into `cls` (see _to_state_dict).
        cfg["posemb_include_cls"] = (cls_row and layout == "augreg") if has_cls else layout == "augreg"
        cfg["extra"]["posemb_cls_row"] = cls_row
    try:
        return ModelConfig(**cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: cannot build a model for this checkpoint ({exc})") from None


def _to_state_dict(params: dict[str, torch.Tensor], posemb: torch.Tensor | None, cfg: ModelConfig,
                   layout: str, path: Path) -> dict[str, torch.Tensor]:
    r = _Reader(params, path)
    if cfg.stem == "hybrid":
        base = "patch_embed.backbone.stem" if cfg.hybrid_layers else "patch_embed.backbone"
        r.conv("conv_root", f"{base}.conv")
        r.norm("gn_root", f"{base}.norm")
        for s, n_units in enumerate(cfg.hybrid_layers, start=1):
            for u in range(1, n_units + 1):
                src = f"block{s}/unit{u}"
                dst = f"patch_embed.backbone.stages.{s - 1}.blocks.{u - 1}"
                for i in (1, 2, 3):
                    r.conv(f"{src}/conv{i}", f"{dst}.conv{i}")
                    r.norm(f"{src}/gn{i}", f"{dst}.norm{i}")
                if f"{src}/conv_proj/kernel" in params:
                    r.conv(f"{src}/conv_proj", f"{dst}.downsample.conv")
                    r.norm(f"{src}/gn_proj", f"{dst}.downsample.norm")
    r.conv("embedding", "patch_embed.proj", bias=True)

    cls = r.maybe("cls")
    if posemb is not None:
        posemb = posemb.reshape(1, -1, posemb.shape[-1])
        if cfg.extra.get("posemb_cls_row") and not cfg.posemb_include_cls:
            # big_vision's fix_old_checkpoints: the cls row only ever meets the class token, so
            # adding it into `cls` once gives the same tokens with a grid-only posemb.
            cls = cls + posemb[:, :1]
            posemb = posemb[:, 1:]
        r.out["pos_embed"] = posemb
    if cls is not None:
        r.out["cls_token"] = cls.reshape(1, 1, -1)

    for i in range(cfg.depth):
        src, dst = _BLOCK.format(i), f"blocks.{i}"
        r.norm(f"{src}LayerNorm_0", f"{dst}.norm1")
        r.heads_in(f"{src}{_MHA}", ("query", "key", "value"), f"{dst}.attn.qkv")
        r.heads_out(f"{src}{_MHA}", f"{dst}.attn.proj")
        r.norm(f"{src}LayerNorm_1", f"{dst}.norm2")
        r.mlp(f"{src}MlpBlock_0", f"{dst}.mlp")
    r.norm("Transformer/encoder_norm", "norm")

    if cfg.pool == "map":
        r.out["attn_pool.latent"] = r.take(f"{_MAP}probe").reshape(1, 1, -1)
        r.heads_in(f"{_MAP}{_MHA}", ("query",), "attn_pool.q")
        r.heads_in(f"{_MAP}{_MHA}", ("key", "value"), "attn_pool.kv")
        r.heads_out(f"{_MAP}{_MHA}", "attn_pool.proj")
        r.norm(f"{_MAP}LayerNorm_0", "attn_pool.norm")
        r.mlp(f"{_MAP}MlpBlock_0", "attn_pool.mlp")
    if cfg.head_hidden:
        r.dense("pre_logits", "pre_logits.fc")
    if cfg.num_classes:
        r.dense("head", "head")

    if r.params:
        left = sorted(r.params)
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise CheckpointError(
            f"{path} has parameters a vitscale ViT cannot hold: {left[:5]}{more}; only plain "
            "pre-LN ViT and R+ViT hybrid checkpoints (token / GAP / MAP heads) are supported"
        )
    return {k: v.contiguous() for k, v in r.out.items()}


# ---------------------------------------------------------------------------------- writing
def _check_writable(cfg: ModelConfig, layout: str) -> None:
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown npz layout {layout!r}; choose one of {LAYOUTS}")
    problems = []
    if cfg.block != "sequential":
        problems.append("parallel blocks")
    if cfg.qk_norm:
        problems.append("QK LayerNorm")
    if cfg.dist_token:
        problems.append("a DeiT distillation token")
    if any(cfg.windowed(i) for i in range(cfg.depth)):
        problems.append("window attention (window_size)")
    if cfg.pool == "gap" and cfg.gap_norm == "pooled":
        problems.append("gap_norm='pooled' (the npz encoder_norm acts on tokens)")
    if cfg.posemb == "none":
        problems.append("posemb='none' (readers take a missing posemb for sincos2d)")
    (gh, gw), cls_row = cfg.grid_size, bool(cfg.class_token and layout == "augreg")
    square = _square_reading(gh * gw + cls_row, bool(cfg.class_token))
    if cfg.posemb == "learn" and gh != gw and square is not None:
        # Any (1, N, D) table is storable, read back at its img_size; but not one whose row count
        # every reader without a size takes for a square grid.
        fold = "; layout='big_vision' folds the class-token row away" if cls_row else ""
        problems.append(f"a {gh}x{gw} posemb grid in {gh * gw + cls_row} rows (readers without an "
                        f"img_size take them for a {square[0]}x{square[0]} grid{fold})")
    if cfg.posemb_ref_grid is not None:
        problems.append("sin-cos positions on another grid's scale (posemb_ref_grid; big_vision "
                        "recomputes them for its own grid)")
    if problems:
        raise CheckpointError(
            f"the big_vision .npz format cannot store {', '.join(problems)}; save in vitscale or "
            "timm format instead"
        )


class _Writer:
    """Pops vitscale-named tensors and stores them under big_vision names as numpy arrays."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.sd = {k: v.detach().cpu() for k, v in state_dict.items()}
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(
                f"state dict lacks {key!r}; pass the state_dict() of the model built from this config"
            )
        return self.sd.pop(key)

    def conv(self, src: str, dst: str) -> None:
        self.out[f"{dst}/kernel"] = self.take(f"{src}.weight").permute(2, 3, 1, 0)  # OIHW -> HWIO
        if f"{src}.bias" in self.sd:
            self.out[f"{dst}/bias"] = self.sd.pop(f"{src}.bias")

    def dense(self, src: str, dst: str) -> None:
        self.out[f"{dst}/kernel"] = self.take(f"{src}.weight").T
        if f"{src}.bias" in self.sd:
            self.out[f"{dst}/bias"] = self.sd.pop(f"{src}.bias")

    def norm(self, src: str, dst: str) -> None:
        self.out[f"{dst}/scale"] = self.take(f"{src}.weight")
        if f"{src}.bias" in self.sd:
            self.out[f"{dst}/bias"] = self.sd.pop(f"{src}.bias")

    def heads_in(self, src: str, names: tuple[str, ...], dst: str, heads: int) -> None:
        weights = self.take(f"{src}.weight").chunk(len(names))
        biases = self.sd.pop(f"{src}.bias").chunk(len(names)) if f"{src}.bias" in self.sd else None
        for j, name in enumerate(names):
            w = weights[j].T  # (D, H*d)
            self.out[f"{dst}/{name}/kernel"] = w.reshape(w.shape[0], heads, -1)
            if biases is not None:
                self.out[f"{dst}/{name}/bias"] = biases[j].reshape(heads, -1)

    def heads_out(self, src: str, dst: str, heads: int) -> None:
        w = self.take(f"{src}.weight").T  # (H*d, D)
        self.out[f"{dst}/out/kernel"] = w.reshape(heads, -1, w.shape[-1])
        if f"{src}.bias" in self.sd:
            self.out[f"{dst}/out/bias"] = self.sd.pop(f"{src}.bias")

    def mlp(self, src: str, dst: str) -> None:
        self.dense(f"{src}.fc1", f"{dst}/Dense_0")
        self.dense(f"{src}.fc2", f"{dst}/Dense_1")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("V2")  # big_vision's bf16 convention
    return t.numpy()


def write_npz(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], path: str | Path,
              layout: str = "augreg") -> Path:
    """Write vitscale weights as a big_vision-style `.npz` ("augreg" or "big_vision" layout).

    "augreg" uses the vit_jax names that timm / vit_jax loaders expect for the released models;
    "big_vision" the names big_vision's models/vit.py loads. The activation and LayerNorm
    epsilon are not stored (readers assume tanh GELU and 1e-6). bf16 tensors are saved as 'V2'
    voids like big_vision does. The file is written atomically.
    """
    _check_writable(cfg, layout)
    w = _Writer(state_dict)
    if cfg.stem == "hybrid":
        base = "patch_embed.backbone.stem" if cfg.hybrid_layers else "patch_embed.backbone"
        w.conv(f"{base}.conv", "conv_root")
        w.norm(f"{base}.norm", "gn_root")
        for s, n_units in enumerate(cfg.hybrid_layers, start=1):
            for u in range(1, n_units + 1):
                src = f"patch_embed.backbone.stages.{s - 1}.blocks.{u - 1}"
                dst = f"block{s}/unit{u}"
                for i in (1, 2, 3):
                    w.conv(f"{src}.conv{i}", f"{dst}/conv{i}")
                    w.norm(f"{src}.norm{i}", f"{dst}/gn{i}")
                if f"{src}.downsample.conv.weight" in w.sd:
                    w.conv(f"{src}.downsample.conv", f"{dst}/conv_proj")
                    w.norm(f"{src}.downsample.norm", f"{dst}/gn_proj")
    w.conv("patch_embed.proj", "embedding")

    cls = w.take("cls_token") if cfg.class_token else None
    if cfg.posemb == "learn":
        pe = w.take("pos_embed")
        has_cls_row = bool(cfg.class_token and cfg.posemb_include_cls)
        if layout == "augreg":
            if cls is not None and not has_cls_row:
                # vit_jax adds the posemb after concatenating cls; a zero cls row reproduces our
                # model, whose class token gets no position embedding.
                pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
            w.out[_VITJAX_POSEMB] = pe
        else:
            if has_cls_row:
                # big_vision posembs cover the grid only; the cls row only ever meets the class
                # token, so fold it in (as big_vision's fix_old_checkpoints does).
                cls = cls + pe[:, :1]
                pe = pe[:, 1:]
            w.out["pos_embedding"] = pe
    if cls is not None:
        w.out["cls"] = cls

    for i in range(cfg.depth):
        src, dst = f"blocks.{i}", _BLOCK.format(i)
        w.norm(f"{src}.norm1", f"{dst}LayerNorm_0")
        w.heads_in(f"{src}.attn.qkv", ("query", "key", "value"), f"{dst}{_MHA}", cfg.heads)
        w.heads_out(f"{src}.attn.proj", f"{dst}{_MHA}", cfg.heads)
        w.norm(f"{src}.norm2", f"{dst}LayerNorm_1")
        w.mlp(f"{src}.mlp", f"{dst}MlpBlock_0")
    w.norm("norm", "Transformer/encoder_norm")

    if cfg.pool == "map":
        w.out[f"{_MAP}probe"] = w.take("attn_pool.latent")
        w.heads_in("attn_pool.q", ("query",), f"{_MAP}{_MHA}", cfg.heads)
        w.heads_in("attn_pool.kv", ("key", "value"), f"{_MAP}{_MHA}", cfg.heads)
        w.heads_out("attn_pool.proj", f"{_MAP}{_MHA}", cfg.heads)
        w.norm("attn_pool.norm", f"{_MAP}LayerNorm_0")
        w.mlp("attn_pool.mlp", f"{_MAP}MlpBlock_0")
    if cfg.head_hidden:
        w.dense("pre_logits.fc", "pre_logits")
    if cfg.num_classes:
        w.dense("head", "head")
    if w.sd:
        raise CheckpointError(
            f"state dict has tensors the npz layout cannot hold: {sorted(w.sd)[:5]}; pass the "
            "state_dict() of a VisionTransformer built from this config"
        )

    arrays = {}
    for key, value in w.out.items():
        if layout == "augreg" and key.startswith("Transformer/encoderblock_"):
            parts = key.split("/")
            parts[2] = _TO_AUGREG.get(parts[2], parts[2])
            key = "/".join(parts)
        arrays[key] = _to_numpy(value)

    def save(tmp: Path) -> None:
        # Through a file object: np.savez would append ".npz" to a temp name that lacks it.
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, save)
