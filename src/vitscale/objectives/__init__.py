"""Training objectives: what one step of `vitscale.train` optimises, plugged into its one loop.

    objective = build_objective(cfg, student, ...)  # cfg.objective: supervised | distill | mpp | mae
    prepared = objective.prepare(images, targets, clean, lam, step)   # whole batch, or None
    loss, correct, counted = objective.loss(model, images, targets, prepared_chunk)
    objective.trainable()         # extra trained parameters (checkpointed as objective.*), or None
    objective.evaluate(...)       # its own evaluation of a split (mpp / mae), or None
    objective.observer(split)     # evaluation-batch callback with extra metrics, or None
    objective.uses_labels         # False: labels are neither read nor mixed (mpp, mae)

The trainer keeps batching, mixing, accumulation, clipping, EMA, checkpoints and logging.
"""

from __future__ import annotations

import torch

from vitscale.config import TrainConfig
from vitscale.errors import ConfigError
from vitscale.objectives.distill import (
    Distill,
    DistillError,
    Teachers,
    hard_distill,
    kl_distill,
    load_teachers,
)
from vitscale.objectives.mae import MaskedAutoencoder
from vitscale.objectives.mpp import MaskedPatchPrediction
from vitscale.objectives.supervised import Objective, loss_fn


def build_objective(cfg: TrainConfig, student: torch.nn.Module, num_classes: int,
                    device: torch.device, layout=None, mesh=None, world=None) -> Objective:
    """The objective `cfg.objective` names, its teachers (if any) loaded on `device`."""
    if cfg.objective == "supervised":
        return Objective(cfg.loss, cfg.label_smoothing)
    if cfg.objective in ("mpp", "mae"):
        if layout is not None and layout.sharded:
            raise ConfigError(f"objective={cfg.objective} is not supported with parallel.dp_shard "
                              "/ tp yet (its mask embedding and head are not sharded); pre-train "
                              "with data parallelism (torchrun, dp_shard=tp=1)")
        from vitscale.train.distributed import World

        dp = World(rank=layout.dp_rank(world.rank), size=layout.replicas) \
            if layout is not None and world is not None else World()
        masks = dict(seed=cfg.seed, batch_size=cfg.data.batch_size,
                     shard=dp.shard(cfg.data.batch_size), rank=dp.rank)
        if cfg.objective == "mpp":
            return MaskedPatchPrediction(cfg.mpp, student, **masks)
        return MaskedAutoencoder(cfg.mae, student, **masks)
    teachers = load_teachers(cfg.distill, num_classes=num_classes, img_size=cfg.data.img_size,
                             device=device, layout=layout, mesh=mesh, parallel=cfg.parallel,
                             world=world)
    objective = Distill(cfg.distill, teachers, loss=cfg.loss, label_smoothing=cfg.label_smoothing,
                        student_features=student.num_features, num_classes=num_classes)
    if objective.trainable() is not None and layout is not None and layout.sharded:
        raise ConfigError(
            f"distill.mode=features with a projection (student width {student.num_features}, "
            f"teacher {teachers.models[0].num_features}) is not supported with parallel.dp_shard / "
            "tp yet; use a student of the teacher's width, mode=function_matching, or DDP")
    return objective


__all__ = ["Distill", "DistillError", "MaskedAutoencoder", "MaskedPatchPrediction", "Objective",
           "Teachers", "build_objective", "hard_distill", "kl_distill", "load_teachers", "loss_fn"]
