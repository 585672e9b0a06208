"""`vitscale detect train | eval`: a torchvision detector with a vitscale backbone on COCO data.

The run directory follows the trainer's conventions (vitscale.train): config.yaml,
metrics.jsonl (+ TensorBoard), checkpoints/step-N/ written atomically with SHA-256 sums and
resumed automatically from the newest readable one, bit for bit on CPU (the batch of a step is a
function of (seed, step), the RPN / RoI samplers draw from the torch RNG the checkpoint keeps).
It adds detector.json (the backbone's model config, the detector kind and the dataset's
categories: what `evaluate_run` rebuilds the detector from) and, at the end, backbone/ (the
trained ViT / As-ViT in vitscale's format, for `vitscale.models.load`). Evaluation rows are
COCO box mAP (pycocotools) with split "val".
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from vitscale.config import DetectConfig, dump_config, load_config
from vitscale.detection.backbone import asvit_backbone, detector, vitdet_backbone
from vitscale.detection.data import CocoSet, hflip
from vitscale.detection.metrics import evaluate_detector
from vitscale.errors import CheckpointError, ConfigError, DataError
from vitscale.train.checkpoint import apply_checkpoint, read_checkpoint, read_newest_loadable, save_checkpoint
from vitscale.train.loop import MetricsLog, RunResult, TrainingError, _Progress, _warn, resolve_device
from vitscale.utils.io import atomic_write_text, read_json

DETECTOR_FILE = "detector.json"


# ---------------------------------------------------------------------------------- building
def build_backbone_model(cfg: DetectConfig):
    """The backbone network (no classifier) the config names, or loads from model.init."""
    from vitscale.models import load
    from vitscale.models.registry import build

    if cfg.model.init:
        overrides = dict(cfg.model.overrides)
        overrides.setdefault("img_size", cfg.data.img_size)
        return load(cfg.model.init, **overrides)
    return build(cfg.model.build_config(num_classes=0, img_size=cfg.data.img_size))


def build_detector(cfg: DetectConfig, num_classes: int, network=None) -> torch.nn.Module:
    """cfg.detector on the backbone `network` (default: `build_backbone_model(cfg)`)."""
    from vitscale.models.asvit import AsViT

    network = build_backbone_model(cfg) if network is None else network
    if isinstance(network, AsViT):
        backbone = asvit_backbone(network, cfg.out_channels)
    else:
        backbone = vitdet_backbone(network, cfg.scales, cfg.out_channels)
    options = dict(cfg.detector_options)
    if cfg.detector != "retinanet":
        options["representation_size"] = cfg.representation_size
    try:
        return detector(cfg.detector, backbone, num_classes, min_size=cfg.data.img_size,
                        max_size=cfg.data.max_size or cfg.data.img_size,
                        anchor_sizes=cfg.anchor_sizes, **options)
    except ConfigError as exc:
        raise ConfigError(f"detector_options: {exc}") from None


def _family(network) -> str:
    from vitscale.models.asvit import AsViT

    return "asvit" if isinstance(network, AsViT) else "vit"


def _network_from(doc: dict[str, Any]):
    from vitscale.models.asvit import AsViT, AsViTConfig
    from vitscale.models.config import ModelConfig
    from vitscale.models.vit import VisionTransformer

    if doc["family"] == "asvit":
        return AsViT(AsViTConfig(**doc["model"]))
    return VisionTransformer(ModelConfig.from_dict(doc["model"]))


# ---------------------------------------------------------------------------------- batches
def batch_indices(step: int, batch_size: int, size: int, seed: int) -> list[int]:
    """The dataset indices of a step's batch: epoch e's order is a permutation seeded by
    (seed, e), so a step's batch depends on nothing but (seed, step)."""
    out, perms = [], {}
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch = k // size
        if epoch not in perms:
            perms[epoch] = torch.randperm(size, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + epoch)).tolist()
        out.append(perms[epoch][k % size])
    return out


def load_batch(dataset: CocoSet, step: int, cfg: DetectConfig, device: torch.device):
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    images, targets = [], []
    for index in batch_indices(step, cfg.data.batch_size, len(dataset), cfg.seed):
        image, target = dataset[index]
        if cfg.data.flip and float(torch.rand((), generator=gen)) < 0.5:
            image, target = hflip(image, target)
        images.append(image.to(device))
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets


# ---------------------------------------------------------------------------------- training
def train_detector(config: DetectConfig | str | Path | None = None,
                   overrides: list[str] | None = None,
                   resume: str | Path | None = None) -> RunResult:
    """Train as `config` says (a DetectConfig, a YAML file, or defaults, plus KEY=VALUE
    `overrides`); resumes automatically when out_dir holds a checkpoint, or from `resume`."""
    from vitscale.optim import apply_lr, build_optimizer

    if isinstance(config, DetectConfig):
        cfg = config if not overrides else load_config(None, overrides, base=config)
    else:
        cfg = load_config(config, overrides, cls=DetectConfig)
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give --data coco:IMAGES_DIR,ANNOTATIONS.json "
                          "(data.train=...)")
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    train_set = CocoSet(cfg.data.train)
    val_set = CocoSet(cfg.data.val) if cfg.data.val else train_set
    if val_set.category_ids != train_set.category_ids:
        raise DataError(f"data.val has categories {val_set.category_ids}, data.train "
                        f"{train_set.category_ids}; use annotation files with the same categories")
    if train_set.clipped:
        _warn(f"{train_set.clipped} boxes of {cfg.data.train} extend past their image; clipped to "
              "it for training")
    torch.manual_seed(cfg.seed)
    network = build_backbone_model(cfg)
    model = build_detector(cfg, train_set.num_classes, network).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    run_dir = Path(cfg.out_dir)
    step = _resume(run_dir, resume, model, optimizer)
    resumed = step if step else None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / DETECTOR_FILE, json.dumps({
        "family": _family(network), "model": network.cfg.to_dict(), "detector": cfg.detector,
        "num_classes": train_set.num_classes, "category_ids": train_set.category_ids,
        "class_names": train_set.class_names}, indent=2) + "\n")
    log = MetricsLog(run_dir, resumed)
    progress = _Progress(cfg.progress, cfg.steps, step)
    last: dict[str, Any] = {}
    final: dict[str, Any] = {}
    window_start, window_images = time.perf_counter(), 0
    try:
        model.train()
        while step < cfg.steps:
            lr = apply_lr(optimizer, step, cfg.steps, cfg.optim.lr, cfg.schedule)
            images, targets = load_batch(train_set, step, cfg, device)
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite detection loss at step {step}; lower optim.lr "
                                    "or keep optim.grad_clip on")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            window_images += len(images)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                last = {"step": step, "split": "train", "lr": lr, "loss": float(loss.detach()),
                        **{k: float(v.detach()) for k, v in losses.items()},
                        "images_per_s": window_images / max(now - window_start, 1e-9)}
                log.write(last)
                window_start, window_images = now, 0
            progress.update(step, last)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                final = {"step": step, "split": "val",
                         **evaluate_detector(model, val_set, device, cfg.data.eval_batch_size)}
                log.write(final)
                model.train()
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                save_checkpoint(run_dir, step, model, optimizer, {}, keep=cfg.keep_checkpoints)
        if not final:  # resumed after the last step: evaluate what is there
            final = {"step": step, "split": "val",
                     **evaluate_detector(model, val_set, device, cfg.data.eval_batch_size)}
    finally:
        progress.close()
        log.close()
    from vitscale.models.weights import save_state

    save_state(network.cfg, network.state_dict(), run_dir / "backbone")
    metrics = {k: v for k, v in final.items() if isinstance(v, (int, float)) and k != "step"}
    return RunResult(run_dir, step, metrics, time.perf_counter() - started)


def _resume(run_dir: Path, resume: str | Path | None, model, optimizer) -> int:
    if resume:
        if not (Path(resume) / "state.json").is_file():
            raise CheckpointError(f"{resume} is not a checkpoint folder (no state.json)")
        files = read_checkpoint(resume)
    else:
        files = read_newest_loadable(run_dir, _warn)
    if files is None:
        return 0
    return int(apply_checkpoint(files, model, optimizer, restore_rng=True)["step"])


# ---------------------------------------------------------------------------------- evaluation
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "data"


def evaluate_run(run_dir: str | Path, source: str | None = None, batch_size: int = 4,
                 device: str = "auto") -> tuple[dict[str, Any], Path]:
    """COCO box mAP of a detection run's newest readable checkpoint on `source` (default: the
    run's data.val, else data.train); writes eval-detect-<data>-step<N>.json into the run
    directory and returns (metrics, that path)."""
    run_dir = Path(run_dir)
    doc = read_json(run_dir / DETECTOR_FILE, CheckpointError,
                    f"is {run_dir} a `vitscale detect train` run directory?")
    cfg = load_config(run_dir / "config.yaml", cls=DetectConfig)
    files = read_newest_loadable(run_dir, _warn, set_aside=False)
    if files is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint yet; train it first "
                              "(vitscale detect train ... out_dir=" + str(run_dir) + ")")
    model = build_detector(cfg, doc["num_classes"], _network_from(doc))
    apply_checkpoint(files, model, restore_rng=False)
    source = source or cfg.data.val or cfg.data.train
    dataset = CocoSet(source)
    if dataset.category_ids != doc["category_ids"]:
        raise DataError(f"{source} has categories {dataset.category_ids}, the detector was trained "
                        f"on {doc['category_ids']}; evaluate on data with the same categories")
    dev = resolve_device(device)
    model.to(dev)
    metrics = {"step": int(files.doc["step"]), "data": source,
               **evaluate_detector(model, dataset, dev, batch_size)}
    out = run_dir / f"eval-detect-{_slug(Path(source.split(',')[-1]).stem)}-step{metrics['step']}.json"
    atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    return metrics, out
