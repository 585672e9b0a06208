"""Weights in and out: vitscale's own format, timm state dicts, and the dispatcher `load(path)`.

Our state-dict keys are timm's, so a timm ViT state dict needs no key map; only its
configuration has to be read off the tensor shapes. big_vision `.npz` files and Hugging Face
transformers folders have their own key maps (`bigvision.py`, `hf.py`).

vitscale format: a folder with `config.json` ({"format": "vitscale", "model": {...}}) and
`model.safetensors`, or a single `.safetensors` file carrying the same JSON in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from vitscale.errors import CheckpointError, ConfigError
from vitscale.models.config import IMG_SIZE_ASSUMED, ModelConfig, pair
from vitscale.models.posemb import resample_grid, resample_patch_kernel
from vitscale.models.registry import SIZES, model_config
from vitscale.models.tensorfile import read_tensor_file, state_dict_mismatch
from vitscale.models.vit import VisionTransformer
from vitscale.utils.io import atomic_write, atomic_write_text, read_json

FORMAT = "vitscale"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "vitscale_config"
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


# ---------------------------------------------------------------------------------- own format
def save(model: VisionTransformer, path: str | Path) -> Path:
    """Save weights + config: a folder, or one `.safetensors` file with the config inside."""
    return save_state(model.cfg, model.state_dict(), path)


def save_state(cfg: Any, state: dict[str, Any], path: str | Path) -> Path:
    """`save` from a model config and its state dict (e.g. gathered from the shards of a
    sharded run)."""
    from safetensors.torch import save_file

    path = Path(path)
    doc = json.dumps({"format": FORMAT, "version": 1, "family": _family(cfg),
                      "model": cfg.to_dict()}, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={METADATA_KEY: doc}))
    if path.suffix != ".safetensors":
        atomic_write_text(path / CONFIG_FILE, doc + "\n")
    return path


def _family(cfg: Any) -> str:
    from vitscale.models.asvit import AsViTConfig

    return "asvit" if isinstance(cfg, AsViTConfig) else "vit"


def _read_own_config(doc: str, where: Path) -> ModelConfig:
    try:
        data = json.loads(doc)
        if data.get("family", "vit") == "asvit":
            from vitscale.models.asvit import AsViTConfig

            return AsViTConfig(**data["model"])
        return ModelConfig.from_dict(data["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{where}: bad model config ({exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: unreadable vitscale config ({exc})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None


# ---------------------------------------------------------------------------------- timm
_UNSUPPORTED_TIMM = {
    "reg_token": "register tokens",
    "norm_pre": "a pre-encoder LayerNorm (CLIP-style)",
    ".ls1.": "LayerScale",
    "patch_embed.norm": "a patch-embedding LayerNorm",
}


def timm_parallel_to_vitscale(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ParallelScalingBlock (fused in_proj = [mlp fc1 | q | k | v]) -> our ParallelBlock."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".in_proj.weight")]:
        pre = key[: -len("in_proj.weight")]
        weight = out.pop(key)
        d = weight.shape[1]
        hidden = weight.shape[0] - 3 * d
        out[pre + "mlp.fc1.weight"], out[pre + "attn.qkv.weight"] = weight[:hidden], weight[hidden:]
        if pre + "in_proj.bias" in out:
            bias = out.pop(pre + "in_proj.bias")
            out[pre + "mlp.fc1.bias"], out[pre + "attn.qkv.bias"] = bias[:hidden], bias[hidden:]
        elif pre + "mlp_bias" in out:
            out[pre + "mlp.fc1.bias"] = out.pop(pre + "mlp_bias")
        _rename_under(out, pre, _PARALLEL_FROM_TIMM)
    return out


# timm's ParallelScalingBlock names -> ours, under one block's prefix.
_PARALLEL_FROM_TIMM = {"in_norm.": "norm1.", "q_norm.": "attn.q_norm.", "k_norm.": "attn.k_norm.",
                       "attn_out_proj.": "attn.proj.", "mlp_out_proj.": "mlp.fc2."}


def _rename_under(sd: dict[str, torch.Tensor], prefix: str, renames: dict[str, str]) -> None:
    """Rename, in place, the keys `prefix + old...` to `prefix + new...`."""
    for k in [k for k in sd if k.startswith(prefix)]:
        rest = k[len(prefix):]
        for old, new in renames.items():
            if rest.startswith(old):
                sd[prefix + new + rest[len(old):]] = sd.pop(k)
                break


def vitscale_parallel_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ParallelBlock -> timm's ParallelScalingBlock layout (the inverse of the above)."""
    out = dict(sd)
    for key in [k for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k)]:
        pre = key[: -len("attn.qkv.weight")]
        if pre + "norm2.weight" in out:  # a sequential block: nothing to do
            continue
        out[pre + "in_proj.weight"] = torch.cat([out.pop(pre + "mlp.fc1.weight"), out.pop(key)])
        fc1_bias = out.pop(pre + "mlp.fc1.bias", None)
        qkv_bias = out.pop(pre + "attn.qkv.bias", None)
        if qkv_bias is not None and fc1_bias is not None:
            out[pre + "in_proj.bias"] = torch.cat([fc1_bias, qkv_bias])
        elif fc1_bias is not None:
            out[pre + "mlp_bias"] = fc1_bias
        _rename_under(out, pre, {new: old for old, new in _PARALLEL_FROM_TIMM.items()})
    return out


def _heads_for(width: int, depth: int, mlp_dim: int) -> int | None:
    for exact in (True, False):
        for size in SIZES.values():
            if size.width == width and (not exact or (size.depth, size.mlp_dim) == (depth, mlp_dim)):
                return size.heads
    return None


def config_from_timm(
    sd: dict[str, torch.Tensor], img_size: Any = None, **known: Any
) -> ModelConfig:
    """Read a ModelConfig off a timm ViT state dict's keys and shapes.

    What shapes cannot tell (heads without QK-norm, eps, activation, a non-square grid) comes from
    `known` fields, from the named size with the same width, or from timm's defaults.
    """
    for marker, what in _UNSUPPORTED_TIMM.items():
        if any(marker in k for k in sd):
            raise CheckpointError(f"this timm checkpoint uses {what}, which vitscale does not support")
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise CheckpointError(
            "not a ViT state dict: no patch_embed.proj / blocks.0.attn.qkv weights; for a "
            "big_vision file use .npz, for Hugging Face transformers pass the model folder"
        )
    if "name" in known and known["name"] and "/" in str(known["name"]):
        base = model_config(known.pop("name"), pool="none").to_dict()  # heads etc. of a named size
    else:
        base = {}
    proj = sd["patch_embed.proj.weight"]
    width, in_feats, kh, kw = proj.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
    cfg: dict[str, Any] = dict(base)
    cfg.update(width=width, depth=depth, mlp_dim=mlp_dim, num_classes=0)
    block0 = "blocks.0."
    cfg["block"] = "sequential" if block0 + "norm2.weight" in sd else "parallel"
    cfg["qkv_bias"] = block0 + "attn.qkv.bias" in sd
    cfg["proj_bias"] = block0 + "attn.proj.bias" in sd
    cfg["mlp_bias"] = block0 + "mlp.fc1.bias" in sd
    cfg["norm_bias"] = block0 + "norm1.bias" in sd
    cfg["qk_norm"] = block0 + "attn.q_norm.weight" in sd
    if cfg["qk_norm"]:
        cfg["heads"] = width // sd[block0 + "attn.q_norm.weight"].shape[0]
    elif "heads" not in known and "heads" not in base:
        heads = _heads_for(width, depth, mlp_dim)
        if heads is None:
            raise CheckpointError(
                f"cannot tell the number of heads of a width-{width} timm checkpoint; pass "
                "heads=N (CLI: --set heads=N) or a model name such as --model S/16"
            )
        cfg["heads"] = heads

    backbone = [k for k in sd if k.startswith("patch_embed.backbone.")]
    if backbone:
        stages: dict[int, set[int]] = {}
        for k in backbone:
            m = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", k)
            if m:
                stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        # Without stages (R-Ti) the root conv sits directly under backbone, not backbone.stem.
        root = next(k for k in ("patch_embed.backbone.stem.conv.weight",
                                "patch_embed.backbone.conv.weight") if k in sd)
        cfg.update(stem="hybrid", hybrid_layers=tuple(len(stages[s]) for s in sorted(stages)),
                   hybrid_width=sd[root].shape[0], in_chans=sd[root].shape[1])
        stride = 4 * 2 ** max(len(stages) - 1, 0)  # as ModelConfig.stem_stride
        patch = (kh * stride, kw * stride)
    else:
        cfg["in_chans"] = in_feats
        patch = (kh, kw)
    cfg["patch"] = patch

    class_token = "cls_token" in sd
    cfg["class_token"] = class_token
    cfg["dist_token"] = "dist_token" in sd  # DeiT distilled (timm VisionTransformerDistilled)
    prefix = int(class_token) + int(cfg["dist_token"])
    if "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1]
        cfg["posemb"] = "learn"
        if img_size is not None:
            img_size = pair(img_size)
            grid_rows = (img_size[0] // patch[0]) * (img_size[1] // patch[1])
        else:
            side = int((rows - prefix) ** 0.5)
            grid_rows = side * side if side * side in (rows, rows - prefix) else rows
            img_size = (int(grid_rows**0.5) * patch[0], int(grid_rows**0.5) * patch[1])
        if rows == grid_rows + prefix and class_token:
            cfg["posemb_include_cls"] = True
        elif rows == grid_rows:
            cfg["posemb_include_cls"] = False
        else:
            raise CheckpointError(
                f"pos_embed has {rows} rows, which fits neither the {grid_rows}-patch grid of "
                f"img_size {img_size} nor that grid plus a class token; pass the training img_size"
            )
    else:
        cfg["posemb"] = known.get("posemb", "none")
        if img_size is None:
            raise CheckpointError("the checkpoint has no pos_embed; pass its img_size")
    cfg["img_size"] = img_size

    if "attn_pool.latent" in sd:
        cfg["pool"] = "map"
        cfg["map_mlp_dim"] = sd["attn_pool.mlp.fc1.weight"].shape[0]
    elif "fc_norm.weight" in sd:
        cfg.update(pool="gap", gap_norm="pooled")
    elif class_token:
        cfg["pool"] = "token"
    else:
        cfg.update(pool="gap", gap_norm="tokens")
    if "pre_logits.fc.weight" in sd:
        cfg["head_hidden"] = sd["pre_logits.fc.weight"].shape[0]
    if "head.weight" in sd:
        cfg["num_classes"] = sd["head.weight"].shape[0]
    cfg.update(known)
    cfg.setdefault("name", "timm")
    try:
        return ModelConfig(**cfg)
    except ConfigError as exc:
        raise CheckpointError(f"cannot build a model for this checkpoint: {exc}") from None


# ---------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, **known: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in vitscale keys) of any supported checkpoint.

    `path`: a vitscale folder or `.safetensors`; a timm state dict (`.safetensors`, `.pth`,
    `.bin`) or a timm hub folder; a big_vision / AugReg `.npz`; a Hugging Face transformers ViT
    folder; or `hf-hub:ORG/NAME[@REVISION]` (downloads, needs a network and huggingface_hub).
    `known`: config fields the file cannot tell (e.g. heads=, img_size= of a bare timm file). For
    a `.npz`, img_size= is the size to read it at: a learned table is read on its grid when the
    rows fit it (the only way to read a non-square one), else on the square grid its rows make;
    a sin-cos file is built at it.
    """
    text = str(path)
    if text.startswith("hf-hub:"):
        from vitscale.models import hf

        repo, revision = hf.parse_hub_ref(text)
        return read_checkpoint(hf.download_hub(repo, revision=revision), **known)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_folder(path, known)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from vitscale.models import bigvision

        cfg, sd = bigvision.read_npz(path, img_size=known.pop("img_size", None))
        # big_vision resamples with scipy zoom(order=1): bilinear, corner-aligned, no antialias.
        cfg = cfg.replace(resample_mode="bilinear", resample_antialias=False,
                          resample_align_corners=True)
        return _apply_known(cfg, known), sd
    if suffix == ".safetensors":
        meta = _safetensors_metadata(path)
        if METADATA_KEY in meta:
            return _apply_known(_read_own_config(meta[METADATA_KEY], path), known), read_tensor_file(path)
    sd = timm_parallel_to_vitscale(read_tensor_file(path))
    img_size = known.pop("img_size", None)
    return config_from_timm(sd, img_size=img_size, **known), sd


def _apply_known(cfg: ModelConfig, known: dict[str, Any]) -> ModelConfig:
    return cfg.replace(**known) if known else cfg


def _read_folder(folder: Path, known: dict[str, Any]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; pass the weights file itself")
    doc = read_json(config_path, CheckpointError, "re-save the model or pass the weights file itself")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{config_path} holds no JSON object; re-save the model or pass the "
                              "weights file itself")
    if doc.get("format") == FORMAT:
        cfg = _read_own_config(config_path.read_text(encoding="utf-8"), config_path)
        return _apply_known(cfg, known), read_tensor_file(folder / WEIGHTS_FILE)
    if doc.get("model_type") == "vit":
        from vitscale.models import hf

        cfg, sd = hf.read_transformers(folder)
        return _apply_known(cfg, known), sd
    if "architecture" in doc:  # a timm model on the Hugging Face hub
        for name in (WEIGHTS_FILE, "pytorch_model.bin"):
            if (folder / name).is_file():
                sd = timm_parallel_to_vitscale(read_tensor_file(folder / name))
                break
        else:
            raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} or pytorch_model.bin")
        heads = doc.get("model_args", {}).get("num_heads")
        if heads and "heads" not in known:
            known["heads"] = heads
        size = doc.get("pretrained_cfg", {}).get("input_size")
        img_size = known.pop("img_size", None) or (tuple(size[1:]) if size else None)
        return config_from_timm(sd, img_size=img_size, name=doc["architecture"], **known), sd
    raise CheckpointError(
        f"{config_path} is neither a vitscale, timm-hub nor transformers ViT config"
    )


# ---------------------------------------------------------------------------------- loading
PATCH_KERNEL = "patch_embed.proj.weight"


def adapt_state_dict(
    sd: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig, reset_head: bool = False
) -> dict[str, torch.Tensor]:
    """Make a state dict of model `src` fit model `dst`: resample the patch kernel to a new patch
    size and the position-embedding grid to a new grid, add or drop its class-token row, add or
    drop a DeiT distillation token (a new one starts as a copy of the class token, its row and
    head), and drop the head when the class count changes (with `reset_head`)."""
    sd = dict(sd)
    src_dist, dst_dist = getattr(src, "dist_token", False), getattr(dst, "dist_token", False)
    if src_dist and not dst_dist:
        for key in ("dist_token", "head_dist.weight", "head_dist.bias"):
            sd.pop(key, None)
    elif dst_dist and not src_dist and "cls_token" in sd:
        sd["dist_token"] = sd["cls_token"].clone()
        for name in ("weight", "bias"):
            if f"head.{name}" in sd:
                sd[f"head_dist.{name}"] = sd[f"head.{name}"].clone()
    kernel = sd.get(PATCH_KERNEL)
    if kernel is not None and tuple(kernel.shape[-2:]) != dst.embed_patch:
        if src.stem != "patch" or dst.stem != "patch":
            raise CheckpointError(f"a {src.stem} model's patch size cannot change "
                                  f"({src.patch} -> {dst.patch}); keep patch={src.patch[0]}")
        sd[PATCH_KERNEL] = resample_patch_kernel(kernel, dst.embed_patch, dst.resample_mode,
                                                 dst.resample_antialias)
    pe = sd.get("pos_embed")
    if pe is not None and dst.posemb == "learn":
        src_prefix, dst_prefix = src.posemb_prefix_rows, dst.posemb_prefix_rows
        src_grid = src.grid_size
        if pe.shape[1] - src_prefix != src_grid[0] * src_grid[1]:
            raise CheckpointError(
                f"pos_embed has {pe.shape[1]} rows, but the source config's {src_grid} grid needs "
                f"{src_grid[0] * src_grid[1] + src_prefix}"
            )
        pe = resample_grid(pe, dst.grid_size, src_grid, src_prefix, dst.resample_mode,
                           dst.resample_antialias, dst.resample_align_corners)
        rows, grid = pe[:, :src_prefix], pe[:, src_prefix:]
        if dst_prefix < src_prefix:
            rows = rows[:, :dst_prefix]
        elif dst_prefix > src_prefix:
            # A token that had no position gets zeros; a new distillation token the class token's.
            new = rows[:, :1] if src_prefix else pe.new_zeros(1, 1, pe.shape[2])
            rows = torch.cat([rows] + [new] * (dst_prefix - src_prefix), dim=1)
        sd["pos_embed"] = torch.cat([rows, grid], dim=1)
    if reset_head or src.num_classes != dst.num_classes:
        if not reset_head:
            raise CheckpointError(
                f"checkpoint head has {src.num_classes} classes but the model wants "
                f"{dst.num_classes}; reset the head (num_classes override / --reset-head) to "
                "fine-tune on the new classes"
            )
        for key in HEAD_KEYS:
            sd.pop(key, None)
    return sd


def load_state_dict_into(
    model: VisionTransformer, sd: dict[str, torch.Tensor], src: ModelConfig,
    reset_head: bool = False,
) -> None:
    """Load `sd` (from a model configured as `src`) into `model`, strictly, with clear errors."""
    sd = adapt_state_dict(sd, src, model.cfg, reset_head=reset_head)
    problem = state_dict_mismatch(model.state_dict(), sd, HEAD_KEYS if reset_head else ())
    if problem:
        raise CheckpointError(f"checkpoint does not match the model: {problem}; check the model "
                              "name / switches (pool, class_token, qk_norm, biases)")
    model.load_state_dict(sd, strict=not reset_head)


def load(path: str | Path, reset_head: bool | None = None, **overrides: Any) -> VisionTransformer:
    """Rebuild a model from any supported checkpoint; `overrides` change the config.

    `img_size=384` resamples the position embeddings to the new grid (sin-cos ones keep the
    positions of the trained grid, `posemb_ref_grid`); a different `num_classes` puts a new
    zero-initialised head on top (fine-tuning). Fields that the file cannot tell (heads of a bare
    timm state dict) are passed the same way. A big_vision `.npz` is read at the img_size given
    when its learned table has that grid's row count (as big_vision does; needed for a non-square
    one); a sin-cos `.npz` records no size and gives big_vision's integer positions on every
    input's grid (`posemb_input_grid`), at whatever img_size it is built.
    """
    shape_free = {k: overrides.pop(k) for k in ("heads", "name") if k in overrides}
    if "img_size" in overrides and str(path).lower().endswith(".npz"):
        shape_free["img_size"] = overrides["img_size"]
    src, sd = read_checkpoint(path, **shape_free)
    fields = [f.name for f in dataclasses.fields(src)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a setting of {path}'s {type(src).__name__}; "
                          f"its settings are {', '.join(fields)}")
    dst = src.replace(**overrides) if overrides else src
    extra = getattr(dst, "extra", None) or {}
    if extra.get(IMG_SIZE_ASSUMED) and "img_size" in overrides:  # no longer a guess
        dst = dst.replace(extra={k: v for k, v in extra.items() if k != IMG_SIZE_ASSUMED})
    if (getattr(dst, "posemb", None) == "sincos2d" and dst.grid_size != src.grid_size
            and not dst.posemb_input_grid and "posemb_ref_grid" not in overrides):
        # Sin-cos positions stay where training put them on the image (as resampling a learned
        # table does); big_vision's integer positions on the new grid: posemb_ref_grid=new grid.
        dst = dst.replace(posemb_ref_grid=src.posemb_ref_grid or src.grid_size)
    if reset_head is None:
        reset_head = dst.num_classes != src.num_classes
    from vitscale.models.registry import build

    model = build(dst)
    if reset_head and isinstance(model.head, torch.nn.Linear):
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    load_state_dict_into(model, sd, src, reset_head=reset_head)
    return model


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights as timm names them (parallel blocks in ParallelScalingBlock layout).

    timm has no fixed sin-cos embedding, so a sin-cos model's table (its trained-grid positions
    included) is written as `pos_embed`, patch rows only: timm's VisionTransformer with
    `no_embed_class=True` (or no class token) then gives the same outputs at the model's img_size,
    which must therefore be known (not assumed, as for a sin-cos .npz loaded without one)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if (getattr(model.cfg, "extra", None) or {}).get(IMG_SIZE_ASSUMED):
        raise CheckpointError(
            f"{model.cfg.name} records no image size (a big_vision sin-cos .npz; "
            f"{model.cfg.img_size[0]} px was assumed) and timm's pos_embed is a table for one "
            "grid; load it with img_size=N, the size the timm model will run at (vitscale "
            "convert: --img-size N)"
        )
    if any(model.cfg.windowed(i) for i in range(model.cfg.depth)):
        raise CheckpointError(
            f"{model.cfg.name} uses window attention (window_size={model.cfg.window_size}), which "
            "timm's VisionTransformer does not have; its outputs there would differ. Save in "
            "vitscale format, or set window_size=0 (model.set_windows(0)) to export global attention")
    if model.cfg.posemb == "sincos2d":
        sd["pos_embed"] = model.pos_embed_fixed.detach().cpu().clone()
    return vitscale_parallel_to_timm(sd) if model.cfg.block == "parallel" else sd


def save_timm(model: VisionTransformer, path: str | Path) -> Path:
    """Write a plain timm state dict: `.safetensors`, or a `.pth`/`.bin` tensor-only pickle."""
    path = Path(path)
    sd = {k: v.contiguous() for k, v in to_timm_state_dict(model).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda p: save_file(sd, str(p)))
    return atomic_write(path, lambda p: torch.save(sd, str(p)))
