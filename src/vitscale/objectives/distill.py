"""Knowledge distillation: a student trained on frozen teachers' outputs (`objective: distill`).

Three modes (`distill.mode`), one trainer:
- function_matching (big_vision's "patient and consistent" distillation, Beyer et al. 2022): the
  student matches the teachers' function, loss t^2 KL(p_teacher || p_student) of the softmaxes at
  temperature t, optionally mixed with the label loss (`label_weight`).
- token (DeiT, Touvron et al. 2021): the student carries a distillation token with its own head;
  loss (1 - alpha) CE(class head, labels) + alpha KD(distillation head, teacher), KD soft (the KL
  above) or hard (cross-entropy to the teacher's top class); the model's logits average the heads.
- features: the student's pooled pre-logits, through a learned linear projection when the widths
  differ, regressed (MSE) onto the teacher's, mixed with the label loss.

Consistency: the teacher runs online on exactly the (augmented, mixed) batch the student sees, in
every accumulation chunk. `distill.consistent=false` is the fixed-teacher baseline: the teacher
sees each example's un-augmented centre crop and its outputs are mixed with the labels' Mixup /
CutMix weights, as precomputed targets would be. Several teachers average their probabilities.

Teachers are loaded with `vitscale.eval.load_model` (vitscale runs, timm, big_vision .npz,
transformers folders), frozen (no gradients, never in the optimizer, eval mode, torch.no_grad),
optionally at their own resolution (`teacher_img_size`: the same crop resized, antialiased) and in
bf16 weights. With a sharded run (parallel.dp_shard / tp) they are sharded like an EMA copy: each
process holds its shards and no gradient or optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.config import DistillConfig
from vitscale.data.mixing import mix_like
from vitscale.errors import UserError
from vitscale.models.config import pair
from vitscale.objectives.supervised import Objective


class DistillError(UserError):
    """A teacher that cannot teach this student on this data."""


# ---------------------------------------------------------------------------------- losses
def kl_distill(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0,
               reduction: str = "batchmean") -> torch.Tensor:
    """t^2 KL(p_teacher || softmax(student / t)): summed over classes and averaged over examples
    ("batchmean", big_vision's `kl` distance) or divided by examples x classes ("numel", DeiT's
    soft distillation loss). `teacher_probs` are the teachers' softmaxes at the same t."""
    t = temperature
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 if given
    log_student = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    teacher = teacher_probs.to(dtype)
    kl = (torch.special.xlogy(teacher, teacher) - teacher * log_student).sum()
    count = student_logits.shape[0] if reduction == "batchmean" else student_logits.numel()
    return kl * (t * t) / count


def hard_distill(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teachers' top class (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits.float(), teacher_probs.argmax(-1))


# ---------------------------------------------------------------------------------- teachers
class Teachers:
    """Frozen teacher models and what the objectives read from them."""

    def __init__(self, models: list[nn.Module], img_size: tuple[int, int], sharded: bool) -> None:
        self.models = models
        self.img_size = img_size
        self.sharded = sharded
        self.dtype = next(models[0].parameters()).dtype

    @property
    def num_classes(self) -> int:
        return self.models[0].cfg.num_classes

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.img_size:  # the same crop, at the teacher's size
            images = F.interpolate(images, size=self.img_size, mode="bilinear", antialias=True,
                                   align_corners=False)
        return images.to(self.dtype)

    def _run(self, fn):
        outs = []
        for model in self.models:
            outs.append(fn(model).float())
            if self.sharded:  # the root's gathered parameters back to shards
                from vitscale.parallel import reshard

                reshard(model)
        return outs

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self._input(images)
        return self._run(lambda model: model(x))

    @torch.no_grad()
    def probs(self, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The ensemble's probabilities: the mean of each teacher's softmax(logits / t)."""
        logits = self.logits(images)
        return torch.stack([F.softmax(z / temperature, dim=-1) for z in logits]).mean(0)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self._input(images)
        return self._run(lambda model: model.forward_pooled(x))[0]


def load_teachers(dcfg: DistillConfig, *, num_classes: int, img_size: int, device: torch.device,
                  layout=None, mesh=None, parallel=None, world=None) -> Teachers:
    """The teachers of `dcfg` on `device`, frozen; sharded as the student when `layout` is."""
    from vitscale.eval.api import load_model
    from vitscale.models.registry import build
    from vitscale.train import distributed

    side = dcfg.teacher_img_size or img_size
    dtype = torch.bfloat16 if dcfg.teacher_dtype == "bfloat16" else torch.float32
    sharded = layout is not None and layout.sharded
    models = []
    for path in dcfg.teachers:
        source = None
        if not sharded or world.is_main:
            source = _load_one(load_model, path, side, dcfg, num_classes)
        if not sharded:
            model = source.to(device=device, dtype=dtype)
        else:
            from vitscale.parallel import build_on_meta, materialize, parallelize

            cfg = distributed.broadcast_object(source.cfg if source is not None else None, world)
            model = build_on_meta(lambda cfg=cfg: build(cfg)).to(dtype)
            parallelize(model, mesh, layout, parallel, train=False)
            materialize(model, device, source.to(dtype) if source is not None else None)
            del source
        model.requires_grad_(False)
        model.eval()
        models.append(model)
    return Teachers(models, pair(side), sharded)


def _load_one(load_model, path: str, side: int, dcfg: DistillConfig, num_classes: int) -> nn.Module:
    where = f"distill teacher {path}"
    if not path.startswith("hf-hub:") and not Path(path).exists():
        raise DistillError(f"{where}: no such file or folder; give a vitscale run directory, a "
                           "timm / big_vision / transformers checkpoint (vitscale distill --teacher)")
    try:
        model = load_model(path, img_size=side, **dcfg.teacher_overrides)
    except UserError as exc:
        hint = ("; give the teacher's settings as distill.teacher_overrides={heads: N}"
                if "heads" in str(exc) else "")
        raise DistillError(f"{where}: {exc}{hint}") from None
    classes = getattr(model.cfg, "num_classes", 0)
    if dcfg.mode != "features":
        if not classes or not isinstance(model.head, nn.Linear):
            raise DistillError(f"{where} is not a classifier (no head); distil its features with "
                               "distill.mode=features, or give a classifier checkpoint")
        if classes != num_classes:
            raise DistillError(f"{where} predicts {classes} classes but the data has {num_classes}; "
                               "give a teacher trained on these classes, or use "
                               "distill.mode=features")
    return model


# ---------------------------------------------------------------------------------- objective
class Distill(Objective):
    """The distillation objective of a TrainConfig with `objective: distill`."""

    name = "distill"

    def __init__(self, dcfg: DistillConfig, teachers: Teachers, *, loss: str, label_smoothing: float,
                 student_features: int, num_classes: int) -> None:
        super().__init__(loss, label_smoothing)
        self.cfg = dcfg
        self.teachers = teachers
        self.needs_clean_view = not dcfg.consistent
        default_weight = 0.5 if dcfg.mode == "features" else 0.0
        self.label_weight = default_weight if dcfg.label_weight is None else dcfg.label_weight
        # Teacher metrics (accuracy, agreement, KL) need a classifier over the same classes.
        self.comparable = teachers.num_classes == num_classes
        self._teacher_reported: set[str] = set()
        self.projection: nn.Module | None = None
        if dcfg.mode == "features":
            width = teachers.models[0].num_features
            if width != student_features:
                self.projection = nn.Linear(student_features, width)

    def trainable(self) -> nn.Module | None:
        return self.projection

    def _teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.mode == "features":
            return self.teachers.features(images)
        return self.teachers.probs(images, self.cfg.temperature)

    def prepare(self, images, targets, clean, lam, step):
        if self.cfg.consistent:
            return None
        return mix_like(self._teacher_targets(clean), lam)  # precomputed-style targets

    def loss(self, model, images, targets, prepared):
        cfg = self.cfg
        teacher = prepared if prepared is not None else self._teacher_targets(images)
        if cfg.mode == "token":
            cls_logits, dist_logits = model(images, outputs="heads")
            if cfg.token_target == "hard":
                kd = hard_distill(dist_logits, teacher)
            else:
                kd = kl_distill(dist_logits, teacher, cfg.temperature, cfg.kl_reduction)
            loss = (1 - cfg.alpha) * self.label_loss(cls_logits, targets) + cfg.alpha * kd
            return loss, *self.hits((cls_logits + dist_logits) / 2, targets)
        if cfg.mode == "features":
            logits, pooled = model(images, outputs="pooled")
            if self.projection is not None:
                pooled = self.projection(pooled.float())
            kd = F.mse_loss(pooled.float(), teacher)
        else:
            logits = model(images)
            kd = kl_distill(logits, teacher, cfg.temperature, cfg.kl_reduction)
        loss = (1 - self.label_weight) * kd
        if self.label_weight:
            loss = loss + self.label_weight * self.label_loss(logits, targets)
        return loss, *self.hits(logits, targets)

    def observer(self, split: str) -> _Agreement | None:
        if not self.comparable:
            return None
        # The teacher's accuracy on a split is reported once (it never changes) and in the final
        # test record; agreement and KL at every evaluation.
        once = split not in self._teacher_reported or split == "test"
        self._teacher_reported.add(split)
        return _Agreement(self.teachers, split, teacher_accuracy=once)


class _Agreement:
    """Teacher accuracy, student-teacher top-1 agreement and KL (at t = 1) over an evaluation."""

    def __init__(self, teachers: Teachers, split: str, teacher_accuracy: bool = True) -> None:
        self.teachers, self.split, self.teacher_accuracy = teachers, split, teacher_accuracy
        self.sums: list[torch.Tensor] | None = None
        self.count = 0

    def __call__(self, images: torch.Tensor, logits: torch.Tensor | None,
                 labels: torch.Tensor | None) -> None:
        probs = self.teachers.probs(images)  # also on padding passes: a sharded teacher's collectives
        if logits is None:
            return
        top = probs.argmax(-1)
        batch = [(top == labels).sum().double(), (logits.argmax(-1) == top).sum().double(),
                 kl_distill(logits, probs).double() * labels.numel()]
        self.sums = batch if self.sums is None else [a + b for a, b in zip(self.sums, batch)]
        self.count += labels.numel()

    def metrics(self, world, device, copies: int) -> dict[str, float]:
        from vitscale.train.distributed import all_sum

        sums = self.sums or [0.0, 0.0, 0.0]
        # A tensor-parallel group's processes count the same examples: `copies` cancels out.
        teacher, agree, kl, count = all_sum([*sums, self.count], world, device)
        count = max(count, 1)
        s = self.split
        out = {f"{s}/agreement": agree / count, f"{s}/kl": kl / count}
        if self.teacher_accuracy:
            out[f"{s}/teacher_accuracy"] = teacher / count
        return out
