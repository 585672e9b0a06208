"""Hugging Face transformers ViT folders in and out, and downloads from the Hugging Face hub.

transformers' ViT is the original ViT: class token, learned position embeddings with a row for
it, pre-LN sequential blocks, a final LayerNorm, and either a classifier on the class token
(`ViTForImageClassification`, keys under `vit.`) or a Dense + tanh pooler on it (`ViTModel`,
keys without a prefix). The pooler is exactly our pre-logits layer, so it becomes `head_hidden`.
Separate query / key / value projections become our fused `attn.qkv` (rows q, k, v).

Files are written in the classic key layout (`encoder.layer.N.attention.attention.query`) that
every transformers version reads; reading also accepts the renamed layout of newer versions
(`layers.N.attention.q_proj`, `mlp.fc1`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vitscale.errors import CheckpointError, ConfigError
from vitscale.models.config import ModelConfig
from vitscale.models.tensorfile import read_tensor_file, short_list, state_dict_mismatch
from vitscale.models.vit import VisionTransformer
from vitscale.utils.io import atomic_write, atomic_write_text, first_line, read_json

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
HUB_PREFIX = "hf-hub:"

# transformers' hidden_act names -> ours. The tanh variants differ only in how the constant
# sqrt(2/pi) is written, far below fp32 resolution.
_ACTS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# ViTConfig's defaults, for config.json files that leave a field out.
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "pooler_act": "tanh",
}

_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Per-layer modules: classic names first (these are also what we write), then newer ones.
_LAYER_MODULES = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")
# Only used for masked-image-modelling inputs, never by classification or features.
_IGNORED = ("embeddings.mask_token",)


# ---------------------------------------------------------------------------------- reading
def is_transformers_dir(path: str | Path) -> bool:
    """True for a folder whose config.json says `model_type: vit`."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("model_type") == "vit"


def read_transformers(
    path: str | Path, pooler: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in vitscale keys) of a transformers ViT folder.

    Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) or
    `pytorch_model.bin` (weights-only). A `ViTModel` pooler becomes `head_hidden` (Dense + tanh
    pre-logits); `pooler=False` drops it and keeps the bare class-token features.
    """
    folder = Path(path)
    doc = _read_config(folder)
    raw = _read_weights(folder)
    sd = _to_vitscale(raw, folder)
    if "head.weight" in sd:
        # ViTForImageClassification feeds the class token straight to the classifier; a pooler
        # next to it would be unused by transformers too.
        sd.pop("pre_logits.fc.weight", None)
        sd.pop("pre_logits.fc.bias", None)
    elif not pooler:
        sd.pop("pre_logits.fc.weight", None)
        sd.pop("pre_logits.fc.bias", None)
    cfg = _config_from_doc(doc, sd, folder)
    _check_state_dict(cfg, sd, f"{folder}: the weights do not match its {CONFIG_FILE}")
    return cfg, sd


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a transformers model folder")
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; pass a transformers model folder")
    doc = read_json(config, CheckpointError, "pass a transformers model folder")
    if not isinstance(doc, dict) or doc.get("model_type") != "vit":
        kind = doc.get("model_type") if isinstance(doc, dict) else None
        raise CheckpointError(
            f"{config} has model_type={kind!r}; only transformers ViT (model_type 'vit') "
            "folders can be read"
        )
    return doc


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_FILE).is_file():
        return read_tensor_file(folder / SAFETENSORS_FILE)
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (folder / index).is_file():
            return _read_sharded(folder, folder / index)
    if (folder / PICKLE_FILE).is_file():
        return read_tensor_file(folder / PICKLE_FILE)
    raise CheckpointError(
        f"{folder} has no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILE}; download the "
        "PyTorch weights too (TensorFlow / Flax files cannot be read)"
    )


def _read_sharded(folder: Path, index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({first_line(exc)})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(read_tensor_file(folder / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index} lists tensors its shards lack: {short_list(missing)}")
    return tensors


def _to_vitscale(raw: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """transformers keys (with or without the `vit.` prefix) -> ours, q/k/v fused."""
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in raw.items():
        name = key.removeprefix("vit.")
        if name in _IGNORED:
            continue
        if name in _TOP_KEYS:
            sd[_TOP_KEYS[name]] = value
            continue
        m = _LAYER_KEY.fullmatch(name)
        ours = _LAYER_MODULES.get(m.group(2)) if m else None
        if ours is None:
            unknown.append(key)
            continue
        layer, param = int(m.group(1)), m.group(3)
        if ours in ("q", "k", "v"):
            qkv.setdefault((layer, param), {})[ours] = value
        else:
            sd[f"blocks.{layer}.{ours}.{param}"] = value
    if unknown:
        raise CheckpointError(
            f"{where}: unexpected weights {short_list(unknown)}; only ViTModel and "
            "ViTForImageClassification checkpoints can be read"
        )
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"{where}: layer {layer} has {param}s for only {sorted(parts)} of query/key/value"
            )
        sd[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return sd


def _config_from_doc(doc: dict[str, Any], sd: dict[str, torch.Tensor], where: Path) -> ModelConfig:
    conf = {**_DEFAULTS, **{k: v for k, v in doc.items() if v is not None}}
    act = conf["hidden_act"]
    if act not in _ACTS:
        raise CheckpointError(
            f"{where}: hidden_act={act!r} is not supported; vitscale has exact GELU ('gelu') and "
            "its tanh approximation ('gelu_pytorch_tanh', 'gelu_new')"
        )
    width, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
    head_dim = doc.get("head_dim")
    if head_dim is not None and heads and int(head_dim) * heads != width:
        raise CheckpointError(
            f"{where}: head_dim={head_dim} x {heads} heads != hidden_size {width}; vitscale needs "
            "head_dim = hidden_size / num_attention_heads"
        )
    head_hidden = None
    if "pre_logits.fc.weight" in sd:
        if conf["pooler_act"] != "tanh":
            raise CheckpointError(
                f"{where}: pooler_act={conf['pooler_act']!r} is not supported (vitscale's "
                "pre-logits layer is Dense + tanh); read with pooler=False to drop the pooler"
            )
        head_hidden = int(sd["pre_logits.fc.weight"].shape[0])
    extra: dict[str, Any] = {"source": "transformers"}
    if doc.get("architectures"):
        extra["architectures"] = list(doc["architectures"])
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    labels = doc.get("id2label")
    if num_classes and isinstance(labels, dict) and len(labels) == num_classes:
        extra["id2label"] = {str(k): str(v) for k, v in labels.items()}
    try:
        return ModelConfig(
            name="transformers",
            img_size=_size(conf["image_size"]),
            patch=_size(conf["patch_size"]),
            in_chans=int(conf["num_channels"]),
            num_classes=num_classes,
            width=width,
            depth=int(conf["num_hidden_layers"]),
            mlp_dim=int(conf["intermediate_size"]),
            heads=heads,
            class_token=True,
            posemb="learn",
            posemb_include_cls=True,
            qkv_bias=bool(conf["qkv_bias"]),
            norm_eps=float(conf["layer_norm_eps"]),
            act=_ACTS[act],
            dropout=float(conf["hidden_dropout_prob"]),
            attn_dropout=float(conf["attention_probs_dropout_prob"]),
            pool="token",
            head_hidden=head_hidden,
            extra=extra,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: unusable {CONFIG_FILE} ({first_line(exc)})") from None


def _size(value: Any) -> int | tuple[int, int]:
    if isinstance(value, (list, tuple)):
        h, w = value
        return (int(h), int(w))
    return int(value)


def _check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], what: str) -> None:
    """Compare key names and shapes with the model `cfg` builds (on the meta device: no memory)."""
    with torch.device("meta"):
        ref = VisionTransformer(cfg).state_dict()
    problem = state_dict_mismatch(ref, sd)
    if problem:
        raise CheckpointError(f"{what}: {problem}")


# ---------------------------------------------------------------------------------- writing
def _unsupported(cfg: ModelConfig) -> list[str]:
    """What of `cfg` transformers' ViT cannot express (empty: it can)."""
    reasons = []
    if not cfg.class_token:
        reasons.append("no class token")
    if cfg.pool == "none":
        if cfg.num_classes or cfg.head_hidden:
            reasons.append("a head on unpooled tokens (pool='none')")
    elif cfg.pool != "token":
        reasons.append(f"{cfg.pool.upper()} pooling (pool={cfg.pool!r})")
    if cfg.posemb != "learn":
        reasons.append(f"posemb={cfg.posemb!r}")
    elif not cfg.posemb_include_cls:
        reasons.append("a position embedding without a class-token row")
    if cfg.block != "sequential":
        reasons.append(f"{cfg.block} blocks")
    if cfg.qk_norm:
        reasons.append("QK LayerNorm")
    if not cfg.norm_bias:
        reasons.append("LayerNorms without bias")
    if not cfg.proj_bias:
        reasons.append("attention output without bias")
    if not cfg.mlp_bias:
        reasons.append("MLP without biases")
    if cfg.stem != "patch":
        reasons.append(f"a {cfg.stem} stem")
    if cfg.head_hidden and cfg.num_classes:
        reasons.append("a pre-logits layer (head_hidden) under a classifier")
    if cfg.dist_token:
        reasons.append("a distillation token (DeiT; transformers' DeiT classes are not written)")
    if any(cfg.windowed(i) for i in range(cfg.depth)):
        reasons.append("window attention (window_size; set window_size=0 for global attention)")
    return reasons


def write_transformers(
    cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path
) -> Path:
    """Write a transformers ViT folder: config.json + model.safetensors.

    With a classifier it is a `ViTForImageClassification`; without, a `ViTModel` whose pooler
    is our pre-logits layer (`head_hidden`), or none (load it with `add_pooling_layer=False`).
    """
    reasons = _unsupported(cfg)
    if reasons:
        raise CheckpointError(
            "transformers' ViT cannot express this model (" + ", ".join(reasons) + "); save it "
            "in vitscale or timm format instead (--to vitscale / --to timm)"
        )
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    _check_state_dict(cfg, sd, f"the state dict does not fit model {cfg.name!r}")
    classifier = cfg.num_classes > 0
    prefix = "vit." if classifier else ""
    out: dict[str, torch.Tensor] = {}
    top = {ours: theirs for theirs, ours in _TOP_KEYS.items()}
    # The first (classic) name of each module is the one written.
    layer_names: dict[str, str] = {}
    for theirs, ours in _LAYER_MODULES.items():
        layer_names.setdefault(ours, theirs)
    for key, value in sd.items():
        if key in top:
            name = top[key]
            out[name if name.startswith("classifier.") else prefix + name] = value.contiguous()
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:  # _check_state_dict admits only the keys of a model transformers can hold
            raise CheckpointError(f"cannot place {key!r} in a transformers ViT")
        layer, module, param = m.groups()
        base = f"{prefix}encoder.layer.{layer}."
        if module == "attn.qkv":
            # Clones: slices of one tensor share storage, which safetensors refuses to save.
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}{layer_names[part]}.{param}"] = chunk.clone()
        else:
            out[f"{base}{layer_names[module]}.{param}"] = value.contiguous()

    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    doc: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if classifier else "ViTModel"],
        "model_type": "vit",
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": _ACT_OUT[cfg.act],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": _size_out(cfg.img_size),
        "patch_size": _size_out(cfg.patch),
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "pooler_output_size": cfg.head_hidden or cfg.width,
        "pooler_act": "tanh",
        # transformers >= 5 reads `dtype`, older versions `torch_dtype`.
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.patch[0] == cfg.patch[1]:
        doc["encoder_stride"] = cfg.patch[0]  # only used by masked-image-modelling heads
    if classifier:
        labels = cfg.extra.get("id2label") if isinstance(cfg.extra, dict) else None
        if not isinstance(labels, dict) or len(labels) != cfg.num_classes:
            labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        doc["id2label"] = {str(k): str(v) for k, v in labels.items()}
        doc["label2id"] = {str(v): int(k) for k, v in labels.items()}

    from safetensors.torch import save_file

    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder; pick a folder path")
    # Weights first: a folder with a config.json always has complete weights next to it.
    atomic_write(folder / SAFETENSORS_FILE,
                 lambda p: save_file(out, str(p), metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder


def _size_out(value: tuple[int, int]) -> int | list[int]:
    return value[0] if value[0] == value[1] else [value[0], value[1]]


# ---------------------------------------------------------------------------------- hub
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/NAME[@REVISION]` -> (repo_id, revision or None)."""
    body = str(ref).strip().removeprefix(HUB_PREFIX)
    repo, at, revision = body.partition("@")
    if not _REPO_ID.fullmatch(repo) or (at and not revision.strip()):
        raise CheckpointError(
            f"bad hub reference {ref!r}; write {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION"
        )
    return repo, (revision.strip() or None)


def download_hub(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Download (or reuse from the cache) a model repository's config and weights.

    Fetches config.json and the safetensors weights; `pytorch_model.bin` only when the
    repository has no safetensors. Returns the local snapshot folder.
    """
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "downloading from the Hugging Face hub needs huggingface_hub; pip install "
            "vitscale[hub], or pass a local model folder"
        ) from None
    ref = repo_id + (f"@{revision}" if revision else "")

    def fetch(patterns: list[str]) -> Path:
        try:
            local = huggingface_hub.snapshot_download(
                repo_id=repo_id, revision=revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                allow_patterns=patterns,
            )
        except Exception as exc:  # network, unknown repo or revision, gated repo, offline mode
            raise CheckpointError(
                f"could not download {HUB_PREFIX}{ref} ({type(exc).__name__}: {first_line(exc)});"
                " check the repository name and revision, the network and HF_TOKEN, or pass a "
                "local model folder"
            ) from None
        return Path(local)

    folder = fetch([CONFIG_FILE, "*.safetensors", "*.safetensors.index.json"])
    if not ((folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file()):
        folder = fetch([CONFIG_FILE, PICKLE_FILE, PICKLE_INDEX, "pytorch_model-*.bin"])
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{HUB_PREFIX}{ref} has no {CONFIG_FILE}; it is not a transformers or timm model "
            "repository"
        )
    if not any((folder / name).is_file()
               for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX)):
        raise CheckpointError(
            f"{HUB_PREFIX}{ref} has no PyTorch weights ({SAFETENSORS_FILE} or {PICKLE_FILE})"
        )
    return folder

