"""`plan(...)`: what one process of a training run holds, whether it fits, the largest batch.

Every figure is per device (process), in bytes, for one training step of `batch` images per
device (the micro-batch: the global batch / data-parallel ranks / accumulation steps); the
total is the peak, at the start of backward (every activation held, the gradients not yet
allocated unless accumulation keeps them) or at its end (gradients whole):

- parameters, gradients, optimizer state: plan/states.py (exact: the real tensors' bytes);
- FSDP2's unsharded buffers: the current and the prefetched block's parameters gathered in
  parallel.param_dtype (dim 0 padded to the shard count), one block's unsharded gradient in
  reduce_dtype before its reduce-scatter, the root's (stem, head) parameters kept gathered;
- DDP's gradient buckets (a second copy of the gradients, torch's default);
- activations: plan/activations.py, with the recomputed block of activation checkpointing.

The total is compared with the device memory less a stated margin (allocator fragmentation,
kernel workspaces, the CUDA context). FLOPs per step: 3 x the forward's (models.counts), plus
one more forward of every recomputed block, per device.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from vitscale.errors import ConfigError
from vitscale.parallel.mesh import Layout
from vitscale.plan.activations import activation_bytes
from vitscale.plan.states import block_params, model_state, param_count

DEFAULT_MARGIN = 0.10
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# bf16 dense peak (TFLOP/s, no sparsity) and memory of common accelerators, from the vendors'
# data sheets; memory as sold (GB for GPUs, GiB for TPUs).
DEVICES: dict[str, tuple[float, str]] = {
    "V100": (125.0, "32GB"),  # fp16 tensor cores (no bf16)
    "A10": (125.0, "24GB"),
    "A100-40GB": (312.0, "40GB"),
    "A100-80GB": (312.0, "80GB"),
    "L4": (121.0, "24GB"),
    "L40S": (362.0, "48GB"),
    "RTX4090": (165.2, "24GB"),
    "H100-PCIe": (756.0, "80GB"),
    "H100-SXM": (989.4, "80GB"),
    "H200": (989.4, "141GB"),
    "B200": (2250.0, "180GB"),
    "TPUv4": (275.0, "32GiB"),
    "TPUv5e": (197.0, "16GiB"),
    "TPUv5p": (459.0, "95GiB"),
}


def parse_memory(text: str | int | float) -> int:
    """'80GiB', '80 GB', '512MiB', or a number of bytes -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"device memory {text!r} is not a size; write it as e.g. 80GiB, "
                              "40GB, 512MiB or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise ConfigError(f"device memory {text!r} must be more than 0")
    return int(value * _UNITS[unit])


def peak_flops(gpu: str | None = None, peak_tflops: float | None = None) -> float | None:
    """FLOP/s of `peak_tflops`, or of a DEVICES entry by name (case-insensitive)."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops {peak_tflops} must be more than 0")
        return peak_tflops * 1e12
    if gpu is None:
        return None
    names = {name.lower(): name for name in DEVICES}
    if gpu.lower() not in names:
        raise ConfigError(f"unknown device {gpu!r}; choose one of {', '.join(DEVICES)} or give "
                          "--peak-tflops")
    return DEVICES[names[gpu.lower()]][0] * 1e12


def _every(act_ckpt: str) -> int:
    from vitscale.config import ParallelConfig

    return ParallelConfig(activation_checkpointing=act_ckpt).checkpoint_every()


@dataclass
class Plan:
    """One process's memory for one training step (bytes), and what follows from it."""

    model: str
    img_size: list[int]
    batch: int  # per device, per micro-batch
    layout: dict
    precision: str
    param_dtype: str
    reduce_dtype: str
    optimizer: str
    act_ckpt: str
    kernel: str
    params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    fsdp_buffers_bytes: int
    comm_buffers_bytes: int
    activations_bytes: int
    total_bytes: int
    device_memory: int
    margin: float
    fits: bool
    max_batch: int
    accum_steps: int  # gradients are held through the peak when > 1
    peak_at: str  # "backward start" (activations held) or "backward end" (gradients whole)
    flops_per_step: float  # per device, for its `batch` images
    step_time_s: float | None
    mfu: float
    peak_flops: float | None

    def to_json(self) -> dict:
        return asdict(self)


def _static_bytes(cfg, optim_cfg, layout: Layout, param_dtype: str,
                  reduce_dtype: str) -> tuple[int, int, int, int, int, int]:
    """(params, grads, optimizer, FSDP buffers while activations are held, FSDP buffers at the
    end of backward, DDP buckets) bytes of the fullest process."""
    state = model_state(cfg, optim_cfg, layout, rank=0)
    fsdp = fsdp_end = ddp = 0
    if layout.dp_shard > 1 or layout.dp_replicate > 1 and layout.tp > 1:  # FSDP2 wraps
        block, root = block_params(cfg, layout)
        p, g = _DTYPE_BYTES[param_dtype], _DTYPE_BYTES[reduce_dtype]
        # the current and the prefetched block gathered, one block's unsharded gradient
        # before its reduce-scatter, the root's parameters kept gathered; at the end of
        # backward, the root's unsharded gradient instead of the blocks'
        fsdp = 2 * block * p + block * g + root * p
        fsdp_end = root * (p + g)
    elif layout.dp_replicate > 1:
        ddp = state.grads
    return state.params, state.grads, state.optimizer, fsdp, fsdp_end, ddp


def plan(model, *, img_size: int | None = None, batch: int = 32, precision: str = "bf16",
         optim: str = "adamw", dp_shard: int = 1, tp: int = 1, dp_replicate: int = 1,
         act_ckpt: str = "none", param_dtype: str = "float32", reduce_dtype: str = "float32",
         sequence_parallel: bool = False, kernel: str = "flash",
         device_memory: str | int = "80GiB", margin: float = DEFAULT_MARGIN,
         num_classes: int = 1000, gpu: str | None = None, peak_tflops: float | None = None,
         mfu: float = 0.4, device: str = "cuda", accum_steps: int = 1,
         optim_cfg=None) -> Plan:
    """Plan one process of a run of `model` (a named size such as "B/16", or a ModelConfig).
    `batch` is per device (per micro-batch)."""
    from vitscale.config import OptimConfig
    from vitscale.models.config import pair

    cfg = _model_config(model, img_size, num_classes)
    if batch < 1:
        raise ConfigError(f"--batch {batch} must be at least 1 image per device")
    if accum_steps < 1:
        raise ConfigError(f"accum_steps {accum_steps} must be at least 1")
    if kernel not in ("flash", "math"):
        raise ConfigError(f"--kernel {kernel!r}: use flash (fused attention) or math")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: use fp32 or bf16")
    if not 0 <= margin < 1:
        raise ConfigError(f"margin {margin} must be in [0, 1)")
    for name, value in (("dp_shard", dp_shard), ("tp", tp), ("dp_replicate", dp_replicate)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least 1")
    layout = Layout(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp)
    if tp > 1:
        _check_tp(cfg, tp, sequence_parallel)
    elif sequence_parallel:
        raise ConfigError("sequence parallelism needs --tp > 1")
    if param_dtype != "float32" and not layout.sharded:
        raise ConfigError("--param-dtype applies to FSDP's gathered parameters; it needs "
                          "--dp-shard or --tp > 1")
    every = _every(act_ckpt)
    optim_cfg = optim_cfg or OptimConfig(name=optim)
    memory = parse_memory(device_memory)
    img = pair(cfg.img_size)

    params, grads, opt, fsdp, fsdp_end, ddp = _static_bytes(cfg, optim_cfg, layout,
                                                            param_dtype, reduce_dtype)

    # Activations are linear in the batch (every saved tensor is per image): two points.
    if closed_form(cfg):
        one, two = (activation_bytes(cfg, b, img, precision, param_dtype, kernel, every, tp,
                                     sequence_parallel, device).peak for b in (1, 2))
    else:
        from vitscale.plan.measure import measured_activations

        if param_dtype != "float32":
            raise ConfigError("--param-dtype bfloat16 is planned for ViTs only (As-ViT and "
                              "hybrid activations are measured with fp32 weights)")
        one, two = (measured_activations(cfg, b, precision, kernel, every).peak for b in (1, 2))
    per_image = two - one

    def activations(b: int) -> float:
        return one + (b - 1) * per_image

    # The peak is at the start of backward, with every activation held: zero_grad sets the
    # gradients to None, so they are not there yet unless accumulation keeps them from the
    # micro-batches before; or at the end of backward, activations gone, gradients whole.
    held = grads if accum_steps > 1 else 0
    static = params + opt + ddp

    def peak_of(b: int) -> tuple[float, str]:
        start = fsdp + held + activations(b)
        end = grads + fsdp_end
        return (static + start, "backward start") if start >= end else (static + end,
                                                                        "backward end")

    act = activations(batch)
    total, peak_at = peak_of(batch)
    budget = memory * (1 - margin)
    max_batch = max(0, int((budget - static - fsdp - held - one) // per_image) + 1)
    while max_batch > 0 and peak_of(max_batch)[0] > budget:
        max_batch -= 1

    flops = forward_flops(cfg, img)
    from vitscale.plan.activations import checkpointed

    depth = sum(cfg.depths) if hasattr(cfg, "depths") else cfg.depth
    recomputed = sum(checkpointed(depth, every)) / depth  # one more forward of those blocks
    step_flops = (3 + recomputed) * flops * batch / tp
    peak = peak_flops(gpu, peak_tflops)
    return Plan(
        model=cfg.name or "custom", img_size=list(img), batch=batch,
        layout={"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp,
                "sequence_parallel": sequence_parallel},
        precision=precision, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
        optimizer=optim_cfg.name, act_ckpt=act_ckpt, kernel=kernel,
        params=param_count(cfg), params_bytes=params, grads_bytes=grads,
        optimizer_bytes=opt, fsdp_buffers_bytes=fsdp, comm_buffers_bytes=ddp,
        activations_bytes=int(math.ceil(act)), total_bytes=int(math.ceil(total)),
        device_memory=memory, margin=margin, fits=total <= budget, max_batch=max_batch,
        accum_steps=accum_steps, peak_at=peak_at,
        flops_per_step=step_flops, step_time_s=step_flops / (peak * mfu) if peak else None,
        mfu=mfu, peak_flops=peak)


def closed_form(cfg) -> bool:
    """A ViT without the hybrid stem: activations in closed form (plan/activations.py)."""
    from vitscale.models.config import ModelConfig

    return isinstance(cfg, ModelConfig) and cfg.stem != "hybrid"


def forward_flops(cfg, img: tuple[int, int]) -> int:
    """Forward FLOPs per image of a ViT (models.counts) or an As-ViT."""
    from vitscale.models.asvit import AsViTConfig, asvit_counts
    from vitscale.models.counts import count

    return asvit_counts(cfg, img).flops if isinstance(cfg, AsViTConfig) else count(cfg, img).flops


def _model_config(model, img_size: int | None, num_classes: int):
    """A ModelConfig / AsViTConfig from a config, a name (B/16, asvit-small, asvit:...) or a
    checkpoint path (a run directory, a vitscale folder, timm / big_vision / HF weights)."""
    from pathlib import Path

    from vitscale.models.asvit import AsViTConfig
    from vitscale.models.config import ModelConfig
    from vitscale.models.registry import any_config

    if isinstance(model, (ModelConfig, AsViTConfig)):
        return model if img_size is None else model.replace(img_size=img_size)
    path = Path(str(model))
    if path.exists():
        from vitscale.models.weights import read_checkpoint

        if (path / "model").is_dir():  # a run directory: its final weights
            path = path / "model"
        cfg, _ = read_checkpoint(path)
        return cfg if img_size is None else cfg.replace(img_size=img_size)
    overrides = {"num_classes": num_classes}
    if img_size is not None:
        overrides["img_size"] = img_size
    return any_config(str(model), **overrides)


def _check_tp(cfg, tp: int, sequence_parallel: bool) -> None:
    from vitscale.parallel.tp import check_tp
    from vitscale.plan.states import meta_model

    model, _ = meta_model(cfg)
    check_tp(model, tp, sequence_parallel)


_STATED = re.compile(r"^#\s*vitscale plan:\s*(\d+)\s*devices?\s*x\s*(\S+)", re.IGNORECASE | re.M)


def stated_devices(path) -> tuple[int, str] | None:
    """(device count, device memory) a config states for itself in a comment line
    `# vitscale plan: 32 devices x 80GiB`, or None."""
    from pathlib import Path

    m = _STATED.search(Path(path).read_text())
    return (int(m.group(1)), m.group(2)) if m else None


def plan_config(path, overrides: list[str] | None = None, *, devices: int | None = None,
                device_memory: str | int | None = None, num_classes: int | None = None,
                **kwargs) -> Plan:
    """Plan a training config as `vitscale train` would run it on `devices` processes (by
    default the count its `# vitscale plan:` comment states, else the fewest its parallel
    section runs on): the layout from `parallel.*`, the micro-batch per device from
    data.batch_size / data-parallel ranks / accum_steps, its precision, optimizer (with its
    groups and settings) and checkpointing."""
    from vitscale.config import load_config

    cfg = load_config(path, overrides or [])
    stated = stated_devices(path)
    par = cfg.parallel
    if devices is None:
        devices = stated[0] if stated else (par.dp_replicate or 1) * par.dp_shard * par.tp
    if device_memory is None:
        device_memory = stated[1] if stated else "80GiB"
    replicate, shard, tp = par.layout(devices)
    ranks = replicate * shard * cfg.accum_steps
    if cfg.data.batch_size % ranks:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into "
                          f"{replicate * shard} data-parallel ranks x accum_steps="
                          f"{cfg.accum_steps} on {devices} devices")
    if num_classes is None:
        num_classes = 10 if cfg.data.source == "digits" else 1000
    model = cfg.model.build_config(num_classes, cfg.data.img_size)
    return plan(model, batch=cfg.data.batch_size // ranks, precision=cfg.precision,
                optim=cfg.optim.name, optim_cfg=cfg.optim, dp_shard=shard, tp=tp,
                dp_replicate=replicate, act_ckpt=par.activation_checkpointing,
                param_dtype=par.param_dtype, reduce_dtype=par.reduce_dtype,
                sequence_parallel=par.sequence_parallel, device_memory=device_memory,
                device="cpu" if cfg.device == "cpu" else "cuda", accum_steps=cfg.accum_steps,
                **kwargs)
