"""Run configuration: dataclasses loaded from YAML, dotted CLI overrides, validation.

Every error a user can make in a config is a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitscale.errors import ConfigError
from vitscale.models.config import ModelConfig


def setting(default: Any = dataclasses.MISSING, *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with the range its numbers must lie in (checked by `check_ranges`,
    element-wise for lists / tuples / dict values; None passes, it means "off" or "auto")."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"bounds": bounds})


def _range_text(bounds: dict[str, float]) -> str:
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"


def _in_bounds(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
            and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf))


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every `setting(...)` field of `cfg` (and of its nested sections) within its bounds, or a
    one-line ConfigError naming the key, its value and the range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        bounds = f.metadata.get("bounds")
        if not bounds or value is None:
            continue
        items = value.values() if isinstance(value, dict) else value \
            if isinstance(value, (list, tuple)) else [value]
        if not all(_in_bounds(v, bounds) for v in items):
            raise ConfigError(f"{key}={value!r} must be {_range_text(bounds)}")


# ---------------------------------------------------------------------------------- model fields
def model_field_types(name: str | None) -> dict[str, Any]:
    """{field: annotated type} of the model family `name` builds (ModelConfig, or AsViTConfig for
    "asvit..." names); None (the family comes from a checkpoint): both, ModelConfig's first."""
    from vitscale.models.asvit import AsViTConfig
    from vitscale.models.registry import is_asvit

    vit, asvit = typing.get_type_hints(ModelConfig), typing.get_type_hints(AsViTConfig)
    if name is None:
        return {**asvit, **vit}
    return asvit if is_asvit(name) else vit


def coerce_model_fields(values: dict[str, Any], name: str | None, prefix: str) -> dict[str, Any]:
    """Model config fields checked and converted to their annotated types (YAML reads
    `norm_eps=1e-5` as a string, a tuple as a list), or a one-line ConfigError naming the field
    as `prefix + field`."""
    types = model_field_types(name)
    out = {}
    for field_name, value in values.items():
        if field_name not in types:
            family = "a model" if name is None else repr(name)
            raise ConfigError(f"{prefix}{field_name}: not a setting of {family}; valid settings: "
                              f"{', '.join(sorted(types))}")
        out[field_name] = _coerce(value, types[field_name], f"{prefix}{field_name}")
    return out


@dataclass
class ModelSection:
    """Which model to build: a named size plus ModelConfig field overrides, or a checkpoint."""

    name: str = "Ti/16"  # a named size ("S/16", "R50+B/16") or As-ViT ("asvit-large", "asvit:K,S,E|...")
    init: str | None = None  # checkpoint to start from (any format `vitscale convert` reads)
    reset_head: bool = True  # with `init`: a new zero-init head when the classes differ
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig / AsViTConfig field

    def __post_init__(self) -> None:
        # Typed at config time, so a bad override fails here and not in the first forward pass.
        self.overrides = coerce_model_fields(self.overrides, None if self.init else self.name,
                                             "model.overrides.")

    def build_config(self, num_classes: int, img_size: int | tuple[int, int]) -> ModelConfig:
        from vitscale.models.registry import any_config

        # The overrides are this family's fields already (checked in __post_init__).
        return any_config(self.name, num_classes=num_classes, img_size=img_size, **self.overrides)


# The AugReg presets by name (their numbers: vitscale.data.transforms.AUGREG_PRESETS).
AugRegPreset = Literal["none", "light1", "light2", "medium1", "medium2", "strong1", "strong2"]


@dataclass
class DataConfig:
    source: str = "digits"  # digits | imagefolder:PATH | webdataset:PATTERN | hf:NAME | torchvision:NAME
    root: str = "data"  # where torchvision datasets are stored / downloaded
    img_size: int = setting(32, ge=1)
    batch_size: int = setting(128, ge=1)
    eval_batch_size: int = setting(256, ge=1)
    num_workers: int = setting(0, ge=0)
    minival_fraction: float = setting(0.1, ge=0, lt=1)  # held out of train for model selection
    augment: AugRegPreset = "light1"  # data.transforms.AUGREG_PRESETS gives each one's numbers
    randaug_layers: int | None = setting(None, ge=0)  # None: from the preset
    randaug_magnitude: int | None = setting(None, ge=0)
    mixup_alpha: float | None = setting(None, ge=0)
    cutmix_alpha: float = setting(0.0, ge=0)
    crop_scale_min: float = setting(0.05, gt=0, le=1)  # inception crop area lower bound
    flip: bool | None = None  # horizontal flips; None: on, except for glyph sources (digits, MNIST)
    max_skip_fraction: float = setting(0.01, ge=0, le=1)  # fail when more unreadable images are skipped
    # Train on a fixed, stratified fraction of the train split (after minival is held out), e.g.
    # 0.1: fine-tuning with 10% of the labels. The subset depends on the data only, not the seed.
    train_fraction: float = setting(1.0, gt=0, le=1)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam_bf16", "adafactor_bv", "sgd"] = "adamw"
    lr: float = setting(1e-3, gt=0)
    weight_decay: float = setting(1e-4, ge=0)
    head_weight_decay: float | None = setting(None, ge=0)  # decoupled head decay (Scaling ViT); None: as body
    decay_norms_and_biases: bool = False  # decay LayerNorm, biases, posemb, tokens too
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)
    momentum: float = setting(0.9, ge=0, lt=1)
    eps: float = setting(1e-8, ge=0)
    lr_mults: dict[str, float] = field(default_factory=dict,  # regex -> lr multiplier
                                       metadata={"bounds": {"ge": 0}})
    grad_clip: float | None = setting(1.0, gt=0)  # global-norm clipping; None: off
    # Layer-wise lr decay (BEiT / ViTDet fine-tuning): block i of a depth-L ViT at
    # lr * layer_decay^(L - i), the patch embedding, tokens and posemb at layer_decay^(L + 1),
    # the final norm, head and anything outside the ViT (a detector's heads) at lr; As-ViT counts
    # its blocks across stages. None: off.
    layer_decay: float | None = setting(None, gt=0, le=1)


@dataclass
class ScheduleConfig:
    decay: Literal["cosine", "linear", "rsqrt", "constant"] = "cosine"
    warmup_steps: int = setting(0, ge=0)
    warmup_fraction: float = setting(0.0, ge=0, le=1)  # instead of warmup_steps: a fraction of all steps
    cooldown_steps: int = setting(0, ge=0)  # linear cooldown to 0 at the end (rsqrt schedule)
    timescale: int = setting(10_000, ge=1)  # rsqrt timescale
    end_lr_fraction: float = setting(0.0, ge=0, le=1)  # linear/cosine end value relative to lr


@dataclass
class FewshotEvalConfig:
    """Few-shot linear regression on the pooled features during training (big_vision's
    fewshot evaluator): every `every` steps and at the end, written to metrics.jsonl."""

    every: int | None = setting(None, ge=0)  # steps; None or 0: off
    source: str | None = None  # None: the training data (its train split and test split)
    shots: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"bounds": {"ge": 1}})
    seeds: int = setting(3, ge=1)
    l2: float = setting(1024.0, ge=0)


@dataclass
class EvalsConfig:
    fewshot: FewshotEvalConfig = field(default_factory=FewshotEvalConfig)


ParallelDtype = Literal["float32", "bfloat16"]


@dataclass
class ParallelConfig:
    """How the processes of a torchrun run split the work (vitscale.parallel): a mesh of
    dp_replicate x dp_shard x tp processes. dp_shard > 1 shards parameters, gradients and
    optimizer state with FSDP2 (HSDP with dp_replicate > 1 too); tp > 1 splits every block's
    heads and MLP across processes (tensor parallelism). With neither, the processes are
    data-parallel replicas (DDP), as a plain torchrun run has always been."""

    dp_shard: int = setting(1, ge=1)
    tp: int = setting(1, ge=1)
    dp_replicate: int | None = setting(None, ge=1)  # None: the world size / (dp_shard x tp)
    # FSDP2's MixedPrecisionPolicy: the dtype of the gathered parameters in forward / backward
    # and of the gradient reduction; the sharded fp32 weights and optimizer state stay fp32.
    param_dtype: ParallelDtype = "float32"
    reduce_dtype: ParallelDtype = "float32"
    activation_checkpointing: str = "none"  # none | full | every:K (every K-th block)
    compile: bool = False  # torch.compile each block (after TP and checkpointing, before FSDP)
    sequence_parallel: bool = False  # with tp: norms / dropout on sequence shards

    def layout(self, world_size: int) -> tuple[int, int, int]:
        """(dp_replicate, dp_shard, tp) for `world_size` processes, or a one-line ConfigError."""
        rest = max(world_size // (self.dp_shard * self.tp), 1)
        replicate = self.dp_replicate if self.dp_replicate is not None else rest
        if replicate * self.dp_shard * self.tp != world_size:
            where = ("this process runs alone (no torchrun)" if world_size == 1 else
                     f"torchrun started {world_size} processes")
            raise ConfigError(
                f"parallel.dp_replicate x dp_shard x tp = {replicate} x {self.dp_shard} x {self.tp} "
                f"= {replicate * self.dp_shard * self.tp}, but {where}; make the product equal the "
                "number of processes (torchrun --nproc_per_node N)")
        return replicate, self.dp_shard, self.tp

    def checkpoint_every(self) -> int:
        """Every how many blocks activations are recomputed: 0 (none), 1 (full), K (every:K)."""
        mode = self.activation_checkpointing
        if mode == "none":
            return 0
        if mode == "full":
            return 1
        every = mode.removeprefix("every:")
        if mode.startswith("every:") and every.isdigit() and int(every) >= 1:
            return int(every)
        raise ConfigError(f"parallel.activation_checkpointing={mode!r} is not valid; use none, full "
                          "or every:K (e.g. every:2: every second block)")


@dataclass
class DistillConfig:
    """Knowledge distillation (`objective: distill`, `vitscale distill`; vitscale.objectives.distill):
    the student (the `model` section) learns from frozen teachers run online on its batch."""

    teachers: list[str] = field(default_factory=list)  # checkpoints models.load reads; several: ensemble
    # function_matching: t^2 KL(teacher || student) at temperature t (big_vision, "patient and
    # consistent"); token: DeiT's distillation token and head; features: the pooled pre-logits
    # matched (MSE) through a learned linear projection when the widths differ.
    mode: Literal["function_matching", "token", "features"] = "function_matching"
    temperature: float = setting(1.0, gt=0)
    # function_matching / features: loss = (1 - w) distillation + w label cross-entropy;
    # None: 0 for function_matching, 0.5 for features (the head learns from the labels only).
    label_weight: float | None = setting(None, ge=0, le=1)
    token_target: Literal["soft", "hard"] = "hard"  # token: KL at the temperature, or CE to argmax
    alpha: float = setting(0.5, ge=0, le=1)  # token: (1 - alpha) CE(class head) + alpha KD(dist head)
    # batchmean: the KL summed over classes, averaged over examples (big_vision, Hinton); numel:
    # divided by examples x classes as DeiT's soft loss is (its legacy normalisation).
    kl_reduction: Literal["batchmean", "numel"] = "batchmean"
    teacher_img_size: int | None = setting(None, ge=1)  # None: the student's data.img_size
    # Model settings a teacher's file cannot tell (a bare timm state dict of a custom width:
    # {heads: 4}), as `vitscale eval --set`; the same for every teacher.
    teacher_overrides: dict[str, Any] = field(default_factory=dict)
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    # false: the fixed-teacher baseline, the teacher on each example's un-augmented centre crop
    # (its outputs mixed as the labels are), while the student sees the augmented batch.
    consistent: bool = True

    def __post_init__(self) -> None:
        self.teacher_overrides = coerce_model_fields(self.teacher_overrides, None,
                                                     "distill.teacher_overrides.")


@dataclass
class MPPConfig:
    """The ViT paper's masked patch prediction (`objective: mpp`; vitscale.objectives.mpp):
    `corrupt_rate` of the patch embeddings are selected; of those `mask_fraction` become a learned
    [mask] embedding, `random_fraction` another patch's embedding of the same image, the rest stay;
    a linear head predicts each selected patch's target from its output token."""

    corrupt_rate: float = setting(0.5, gt=0, lt=1)
    mask_fraction: float = setting(0.8, ge=0, le=1)
    random_fraction: float = setting(0.1, ge=0, le=1)
    # mean3bit: the patch's mean colour, 3 bits per channel (one 512-way class); patch4x4_3bit:
    # the patch downsized to 4x4, each pixel's colour a 512-way class (16 outputs); l2: the
    # patch's pixels regressed (mean squared error).
    target: Literal["mean3bit", "patch4x4_3bit", "l2"] = "mean3bit"


@dataclass
class MAEConfig:
    """Masked autoencoding (He et al.; `objective: mae`, vitscale.objectives.mae): the encoder
    runs on the visible patches only, a light decoder reconstructs the hidden ones' pixels."""

    mask_ratio: float = setting(0.75, gt=0, lt=1)
    decoder_width: int = setting(512, ge=1)
    decoder_depth: int = setting(8, ge=1)
    decoder_heads: int = setting(16, ge=1)
    decoder_mlp_ratio: float = setting(4.0, gt=0)
    norm_pix_loss: bool = True  # the target: each patch's pixels normalised by its own mean / std


PRETRAINING_OBJECTIVES = ("mpp", "mae")  # label-free: the data's labels are never read


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    evals: EvalsConfig = field(default_factory=EvalsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # What a step optimises (vitscale.objectives): the labels, frozen teachers (`distill`), or no
    # labels at all: masked patch prediction (`mpp`) or masked autoencoding (`mae`).
    objective: Literal["supervised", "distill", "mpp", "mae"] = "supervised"
    distill: DistillConfig = field(default_factory=DistillConfig)
    mpp: MPPConfig = field(default_factory=MPPConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    seed: int = setting(0, ge=0)
    epochs: float = 10.0  # > 0 unless steps is set
    steps: int | None = setting(None, ge=1)  # overrides epochs when set
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    accum_steps: int = setting(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast
    ema_decay: float | None = setting(None, gt=0, lt=1)  # Polyak / EMA of weights, evaluated beside the raw
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)): no lag in short runs
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # With on_nonfinite=skip: stop (one line) once more than this fraction of all steps is skipped.
    max_skipped_fraction: float = setting(0.1, ge=0, le=1)
    # Progressive re-tokenization (As-ViT models): [[start fraction of training, stride,
    # dilation], ...] for the tokenizer, e.g. [[0, 16, 5], [0.33, 8, 2], [0.67, 4, 1]].
    retokenize: list[list[float]] = field(default_factory=list)
    log_every: int = setting(10, ge=1)
    eval_every: int | None = setting(None, ge=1)  # steps; None: once per epoch
    ckpt_every: int | None = setting(None, ge=1)  # steps; None: once per epoch
    keep_checkpoints: int = setting(2, ge=1)
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Bitwise-reproducible CUDA runs (resume included): deterministic kernels and cuBLAS
    # workspace, at some speed. CPU runs are reproducible without it.
    deterministic: bool = False
    progress: bool = True


@dataclass
class DetectDataConfig:
    """COCO-format detection data (`coco:IMAGES_DIR,ANNOTATIONS.json`, vitscale.detection.data)."""

    train: str = ""
    val: str | None = None  # None: evaluate on the training set
    img_size: int = setting(128, ge=16)  # the detector resizes the shorter side to this
    max_size: int | None = setting(None, ge=16)  # cap of the longer side; None: img_size
    batch_size: int = setting(2, ge=1)
    eval_batch_size: int = setting(4, ge=1)
    flip: bool = True  # random horizontal flips of the training images (and boxes)


def _detect_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, weight_decay=0.1)  # AdamW, ViTDet's lr and decay


@dataclass
class DetectConfig:
    """`vitscale detect train`: a torchvision detector on a ViT (ViTDet's simple feature
    pyramid) or As-ViT (FPN) backbone, trained on COCO-format data."""

    model: ModelSection = field(default_factory=ModelSection)  # the backbone, as for training
    detector: Literal["fasterrcnn", "retinanet"] = "fasterrcnn"
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # ViT: pyramid scales
    out_channels: int = setting(256, ge=1)
    anchor_sizes: list[float] | None = setting(None, gt=0)  # one per level; None: 8 x stride
    representation_size: int = setting(1024, ge=1)  # box head width (Faster R-CNN)
    # Further keyword arguments of the torchvision detector class, e.g.
    # {box_batch_size_per_image: 128, rpn_post_nms_top_n_train: 500}.
    detector_options: dict[str, Any] = field(default_factory=dict)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=_detect_optim)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = setting(100, ge=1)
    seed: int = setting(0, ge=0)
    log_every: int = setting(10, ge=1)
    eval_every: int | None = setting(None, ge=1)  # steps; None: at the end only
    ckpt_every: int | None = setting(None, ge=1)  # steps; None: at the end only
    keep_checkpoints: int = setting(2, ge=1)
    out_dir: str = "runs/detect"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True


def validate_DetectConfig(cfg: DetectConfig) -> None:  # noqa: N802 - looked up by class name
    check_ranges(cfg)  # an empty data.train is refused when training starts (a recipe has none)
    for key in ("train", "val"):
        value = getattr(cfg.data, key)
        if value and not value.startswith("coco:"):
            raise ConfigError(f"data.{key}={value!r} is not coco:IMAGES_DIR,ANNOTATIONS.json")
    if cfg.model.init:
        return
    try:
        cfg.model.build_config(num_classes=0, img_size=cfg.data.img_size)
    except ConfigError as exc:
        raise ConfigError(f"model {cfg.model.name!r} at data.img_size={cfg.data.img_size}: "
                          f"{exc}") from None


# ---------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the annotated type, or raise a ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return value
    if origin is Literal:  # a choice: the valid values are the annotation's
        valid = typing.get_args(tp)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of "
                              f"{', '.join(map(str, valid))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vtp = typing.get_args(tp)
        return {str(k): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (etp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, etp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(item: str, example: str = "optim.lr=0.001") -> tuple[str, Any]:
    """'key=value' -> (key, value read as a YAML scalar / list; the raw text when it is not
    valid YAML, so the type check names the key instead of YAML printing a traceback)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad setting {item!r}; write KEY=VALUE, e.g. {example}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def parse_model_settings(items: list[str] | None, prefix: str = "--set ") -> dict[str, Any]:
    """['heads=6', 'norm_eps=1e-5'] -> {'heads': 6, 'norm_eps': 1e-05}: model config fields,
    typed as `ModelSection.overrides` are (any model family: a checkpoint decides)."""
    pairs = [parse_override(item, example="heads=6") for item in items or []]
    return coerce_model_fields(dict(pairs), None, prefix)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = TrainConfig, base: Any = None) -> Any:
    """A validated config from a YAML file (or `base`, or defaults) plus `key.sub=value`
    overrides."""
    data: dict[str, Any] = to_dict(base) if base is not None else {}
    if base is not None:
        cls = type(base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise ConfigError(f"{path} is not valid YAML{line}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = _build(cls, data)
    validate = getattr(cfg, "validate", None) or globals().get(f"validate_{cls.__name__}")
    if validate:
        validate(cfg)
    return cfg


def validate_TrainConfig(cfg: TrainConfig) -> None:  # noqa: N802 - looked up by class name
    check_ranges(cfg)  # choices (Literal fields) were checked as the values were read
    world = int(os.environ.get("WORLD_SIZE", 1))  # processes of a torchrun run
    # A config loads anywhere (inspection, evaluating its run); training refuses a mesh that does
    # not fit its processes (ParallelConfig.layout, when the Trainer starts, before any write).
    # Data-parallel ranks: the processes of a tensor-parallel group share their examples.
    replicas = max(world // cfg.parallel.tp, 1)
    checks = [
        (cfg.epochs > 0 or (cfg.steps or 0) > 0, "epochs", "must be positive (or set steps)"),
        (cfg.data.batch_size % (cfg.accum_steps * replicas) == 0, "data.batch_size",
         f"must be divisible by accum_steps={cfg.accum_steps}"
         + (f" x {replicas} data-parallel processes" if replicas > 1 else "")),
    ]
    cfg.parallel.checkpoint_every()
    sharded = cfg.parallel.dp_shard > 1 or cfg.parallel.tp > 1
    if not sharded and (cfg.parallel.param_dtype, cfg.parallel.reduce_dtype) != ("float32", "float32"):
        raise ConfigError("parallel.param_dtype / reduce_dtype apply to FSDP (parallel.dp_shard > 1 "
                          "or parallel.tp > 1); without sharding use precision=bf16 (autocast)")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it shards the "
                          "token sequence across a tensor-parallel group)")
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r} {message}")
    _validate_retokenize(cfg.retokenize)
    _validate_distill(cfg)
    _validate_pretraining(cfg)
    # The model must be buildable at the data resolution (e.g. img_size divisible by patch).
    # With model.init the checkpoint's own config decides, checked when it is loaded.
    if cfg.model.init:
        return
    try:
        cfg.model.build_config(num_classes=1, img_size=cfg.data.img_size)
    except ConfigError as exc:
        raise ConfigError(f"model {cfg.model.name!r} at data.img_size={cfg.data.img_size}: "
                          f"{exc}") from None


def _validate_distill(cfg: TrainConfig) -> None:
    """A distillation run names its teachers; DeiT's token mode gives the student its token."""
    if cfg.objective != "distill":
        return
    if not cfg.distill.teachers:
        raise ConfigError("objective=distill needs a teacher: vitscale distill --teacher CKPT, or "
                          "distill.teachers=[CKPT, ...]")
    if cfg.distill.mode == "features" and len(cfg.distill.teachers) > 1:
        raise ConfigError("distill.mode=features matches one teacher's features; give one "
                          "teacher, or use mode=function_matching for an ensemble")
    if cfg.distill.mode == "token" and not cfg.model.overrides.get("dist_token"):
        from vitscale.models.registry import is_asvit

        if not cfg.model.init and is_asvit(cfg.model.name):
            raise ConfigError("distill.mode=token needs a ViT student (DeiT's distillation token); "
                              "an As-ViT student distils with mode=function_matching")
        if not cfg.model.init:
            pool = cfg.model.build_config(num_classes=1, img_size=cfg.data.img_size).pool
            if pool != "token":
                raise ConfigError(f"distill.mode=token needs a class-token student (DeiT), but "
                                  f"model pool is {pool!r}; set model.overrides.pool=token")
        cfg.model.overrides["dist_token"] = True


def _validate_pretraining(cfg: TrainConfig) -> None:
    """mpp / mae: a plain patch ViT encoder, no label mixing, a valid corruption split."""
    if cfg.objective not in PRETRAINING_OBJECTIVES:
        return
    name = cfg.objective
    if cfg.mpp.mask_fraction + cfg.mpp.random_fraction > 1 + 1e-9:
        raise ConfigError(f"mpp.mask_fraction + mpp.random_fraction = "
                          f"{cfg.mpp.mask_fraction + cfg.mpp.random_fraction:g} must be <= 1 (the "
                          "rest of the selected patches stay unchanged); e.g. 0.8 and 0.1")
    from vitscale.data.transforms import resolve_augment

    aug = resolve_augment(cfg.data)
    if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
        raise ConfigError(f"objective={name} reads no labels, so Mixup / CutMix do not apply (data."
                          f"augment={cfg.data.augment} gives mixup_alpha={aug.mixup_alpha:g}); set "
                          "data.mixup_alpha=0 and data.cutmix_alpha=0")
    if cfg.distill.teachers:
        raise ConfigError(f"objective={name} trains without teachers; drop distill.teachers or "
                          "use objective=distill")
    if cfg.retokenize:
        raise ConfigError(f"objective={name} needs a ViT encoder; retokenize is As-ViT's")
    if cfg.model.init:
        return  # the checkpoint's model is checked when it is loaded (objectives.pretrain)
    from vitscale.models.registry import is_asvit

    if is_asvit(cfg.model.name):
        raise ConfigError(f"objective={name} needs a ViT with a patch embedding; As-ViT's "
                          "overlapping tokenizer and token merging have no per-patch tokens to "
                          "mask; use a ViT (model.name=S/16, Ti/4, ...)")


def _validate_retokenize(phases: list[list[float]]) -> None:
    if not phases:
        return
    hint = "write retokenize=[[0,16,5],[0.33,8,2],[0.67,4,1]] (start fraction, stride, dilation)"
    starts = []
    for phase in phases:
        if len(phase) != 3 or phase[1] < 1 or phase[2] < 1 or phase[1] != int(phase[1]) \
                or phase[2] != int(phase[2]) or not 0 <= phase[0] < 1:
            raise ConfigError(f"retokenize phase {phase} is not [start in [0, 1), stride, "
                              f"dilation]; {hint}")
        starts.append(phase[0])
    if starts[0] != 0 or starts != sorted(set(starts)):
        raise ConfigError(f"retokenize starts {starts} must begin at 0 and increase; {hint}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
