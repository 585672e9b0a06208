"""`vitscale train`: the training loop.

Everything that decides a step's numbers is a function of (config, step, restored state): the
batch comes from a deterministic stream addressed by step, Mixup/CutMix draw from a generator
seeded by (seed, step), dropout draws from the global torch RNG saved in each checkpoint. So a
run resumed from its last checkpoint reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitscale.config import PRETRAINING_OBJECTIVES, TrainConfig, dump_config, load_config
from vitscale.errors import CheckpointError, ConfigError, DataError, UserError
from vitscale.objectives.supervised import loss_fn
from vitscale.train import distributed
from vitscale.train.checkpoint import (
    apply_checkpoint,
    apply_sharded_checkpoint,
    read_checkpoint,
    read_newest_loadable,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from vitscale.train.distributed import SINGLE, World, all_sum, world_from_env
from vitscale.train.ema import EMA
from vitscale.utils.io import atomic_write_text


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, unusable data)."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0  # this process's time in fit(), evaluation and saving included
    is_main: bool = True  # False in the other processes of a data-parallel run
    objective: str = "supervised"  # what test/loss and test/accuracy measure (cfg.objective)


# ---------------------------------------------------------------------------------- pieces
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def make_deterministic() -> tuple[bool, bool]:
    """Deterministic kernels for this process: cuBLAS needs a fixed workspace, set before its
    first use, and cuDNN must not benchmark algorithms. Returns the previous switches, which
    are process-global, for `restore_determinism`."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return previous


def restore_determinism(previous: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.benchmark = previous[1]


def build_model(cfg: TrainConfig, num_classes: int):
    """The model to train: built from `cfg.model`, or loaded from `model.init` (a run directory
    stands for its final weights). A label-free objective trains an encoder without a head."""
    from vitscale.eval.api import resolve_checkpoint
    from vitscale.models import load
    from vitscale.models.registry import build

    if cfg.objective in PRETRAINING_OBJECTIVES:
        num_classes = 0
    if cfg.model.init:
        overrides = dict(cfg.model.overrides)
        overrides.update(img_size=cfg.data.img_size, num_classes=num_classes)
        return load(resolve_checkpoint(cfg.model.init), reset_head=cfg.model.reset_head or None,
                    **overrides)
    return build(cfg.model.build_config(num_classes, cfg.data.img_size))


def total_steps(cfg: TrainConfig, train_size: int) -> int:
    if cfg.steps:
        return cfg.steps
    per_epoch = max(train_size // cfg.data.batch_size, 1)
    return max(int(math.ceil(cfg.epochs * per_epoch)), 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str,
             world: World = SINGLE, loss: str = "softmax", copies: int = 1,
             lockstep: int | None = None, observe=None) -> dict[str, float]:
    """Top-1 accuracy and the mean of the run's loss (softmax or sigmoid cross-entropy, no label
    smoothing) over `loader`; with several processes each passes its shard of the split and the
    counts are summed (`copies`: how many processes evaluate each shard, e.g. a tensor-parallel
    group). `lockstep`: run exactly this many forward passes, padding with a throw-away batch,
    for a sharded model whose every forward pass is a collective. `observe(images, logits,
    labels)` is called on every batch (an objective's extra metrics; logits and labels None on a
    padding pass)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total, passes, spare = 0, 0, None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        if observe is not None:
            observe(x, logits, y)
        targets = F.one_hot(y, logits.shape[-1]).float()
        loss_sum += loss_fn(logits, targets, loss, 0.0).double() * y.numel()
        correct += (logits.argmax(-1) == y).sum()
        total += y.numel()
        passes, spare = passes + 1, x[:1]
    for _ in range(passes, lockstep or 0):
        if spare is None:  # this process's shard was empty: any image of the right size
            cfg = model.cfg
            spare = torch.zeros(1, getattr(cfg, "in_chans", 3), *_pair(cfg.img_size), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(spare)
        if observe is not None:
            observe(spare, None, None)
    correct, total, loss_sum = all_sum([correct, total, loss_sum], world, device)
    total /= copies
    return {"accuracy": correct / copies / max(total, 1), "loss": loss_sum / copies / max(total, 1),
            "n": int(total)}


def _pair(side: Any) -> tuple[int, int]:
    return (side, side) if isinstance(side, int) else tuple(side)


def _kept(record: dict[str, Any], resume_step: int) -> bool:
    step = record.get("step", 0)
    return step < resume_step or (step == resume_step and record.get("split") != "test")


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus TensorBoard scalars when available."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop lines written after the checkpoint we resume from: they will be redone; so
            # will the final "test" row when the run stopped between its last checkpoint and
            # the end.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _kept(json.loads(line), resume_step)]
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.fh = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is a dependency

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.fh.close()
        self.tb.close()


# ---------------------------------------------------------------------------------- the run
def run(config: TrainConfig | str | Path | dict | None = None,
        overrides: list[str] | None = None, resume: str | Path | None = None) -> RunResult:
    """Train as `config` says; resumes automatically when `out_dir` holds a checkpoint."""
    if isinstance(config, TrainConfig):
        cfg = config if not overrides else load_config(None, overrides, base=config)
    else:
        cfg = load_config(config, overrides)
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.created_group)
        if trainer.determinism_before is not None:  # later runs in this process get theirs back
            restore_determinism(trainer.determinism_before)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None) -> None:
        from vitscale.data import build_data
        from vitscale.optim import build_optimizer
        from vitscale.parallel import Layout, build_mesh

        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
        self.world = world_from_env()
        self.layout = Layout(*cfg.parallel.layout(self.world.size))
        self.device = distributed.device_for(self.world, resolve_device(cfg.device))
        self.determinism_before = make_deterministic() if cfg.deterministic else None
        self.created_group = distributed.init(self.world, self.device)
        self.mesh = build_mesh(self.layout, self.device) if self.layout.sharded else None
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.data = build_data(cfg.data, cfg.seed)
        self._check_labels()
        self.model, self.ema = self._build_models()
        self.objective, self.extras = self._build_objective()
        self.optimizer = build_optimizer(self.model, cfg.optim, extra=self.extras)
        self.train_model: torch.nn.Module = self.model
        if self.world.distributed and not self.layout.sharded:
            from torch.nn.parallel import DistributedDataParallel

            # A pre-training objective leaves the head side (pooling, classifier) without
            # gradients, which DDP must be told to expect.
            self.train_model = DistributedDataParallel(
                self.model, find_unused_parameters=not self.objective.uses_whole_model)
        self.dp_rank = self.layout.dp_rank(self.world.rank)
        if self.world.distributed:
            # Dropout / drop-path masks differ between data-parallel ranks, as between examples;
            # the ranks of a tensor-parallel group hold the same examples, so they draw alike.
            torch.manual_seed(cfg.seed * 1_000_003 + self.dp_rank)
        self.total = total_steps(cfg, len(self.data.train))
        self.params = sum(p.numel() for p in self.model.parameters())  # DTensors: global numel
        self.phases = self._retokenize_phases()
        self.step = 0
        self.skipped_steps = 0
        self.best: dict[str, float] = {}
        self._fewshot_data = None  # built on first use
        self._eval_loaders: dict[str, Any] = {}
        self.resumed_from: int | None = None
        self._resume(resume)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))

    def _check_labels(self) -> None:
        """Unlabelled data (a flat image folder) trains only the label-free objectives."""
        cfg = self.cfg
        if self.data.labelled:
            return
        if cfg.objective not in PRETRAINING_OBJECTIVES:
            raise DataError(f"data.source={cfg.data.source} has no labels (a flat folder of "
                            f"images), which objective={cfg.objective} needs; give class "
                            "sub-folders (PATH/<class>/<image>) or pre-train with objective=mpp / mae")
        if cfg.evals.fewshot.every and not cfg.evals.fewshot.source:
            raise ConfigError(f"evals.fewshot needs labelled images but data.source="
                              f"{cfg.data.source} has none; set evals.fewshot.source to a labelled "
                              "source (e.g. imagefolder:PATH of class folders)")

    def _build_models(self) -> tuple[torch.nn.Module, EMA | None]:
        """(the model to train, its EMA or None), parallelized as cfg.parallel says.
        Sharded: built on the meta device in every process and filled from rank 0's CPU model,
        so the weights equal a one-process run's (vitscale.parallel.init)."""
        from vitscale.models.registry import build
        from vitscale.parallel import build_on_meta, materialize, parallelize

        cfg, layout, decay = self.cfg, self.layout, self.cfg.ema_decay
        if not layout.sharded:
            model = build_model(cfg, self.data.num_classes).to(self.device)
            ema = EMA(model, decay) if decay else None  # copied before checkpointing / compile
            parallelize(model, None, layout, cfg.parallel)
            return model, ema
        source = build_model(cfg, self.data.num_classes) if self.world.is_main else None
        model_cfg = distributed.broadcast_object(source.cfg if source is not None else None, self.world)
        built = []
        for train in (True, False) if decay else (True,):
            model = build_on_meta(lambda: build(model_cfg))
            parallelize(model, self.mesh, layout, cfg.parallel, train=train)
            materialize(model, self.device, source)
            built.append(model)
        del source
        return built[0], EMA.over(built[1], decay) if decay else None

    def _build_objective(self):
        """(the objective of cfg.objective, the module of its own trained parameters or None)."""
        from vitscale.objectives import build_objective

        objective = build_objective(self.cfg, self.model, self.data.num_classes, self.device,
                                    self.layout, self.mesh, self.world)
        extras = objective.trainable()
        return objective, extras.to(self.device) if extras is not None else None

    def _resume(self, resume: str | Path | None) -> None:
        if resume:  # the checkpoint asked for, or a one-line error: no silent fallback
            if not (Path(resume) / "state.json").is_file():
                raise CheckpointError(f"{resume} is not a checkpoint folder (no state.json)")
            files = read_checkpoint(resume, self.world)
        else:
            quiet = lambda _message: None  # noqa: E731 - the other processes: rank 0 warns
            files = read_newest_loadable(self.run_dir, _warn if self.world.is_main else quiet,
                                         set_aside=self.world.is_main, world=self.world)
        if files is None:
            return
        ema = self.ema.module if self.ema else None
        if files.sharded:
            doc = apply_sharded_checkpoint(files, self.model, self.optimizer, ema)
        elif self.layout.sharded:
            raise CheckpointError(
                f"{files.path} was written by a run without sharding (parallel.dp_shard = tp = 1); "
                "resume it with that layout, or start a new run from its weights (model.init)")
        else:
            doc = apply_checkpoint(files, self.model, self.optimizer, ema, restore_rng=False,
                                   extras=self.extras)
        rngs = doc.get("rng_per_process", [doc["rng"]])
        if len(rngs) == self.world.size:
            set_rng_state(rngs[self.world.rank])
        elif files.sharded:  # DCP reshards the state; the dropout streams cannot be
            if self.world.is_main:
                _warn(f"resuming {files.path.name}, written by {len(rngs)} process(es), with "
                      f"{self.world.size}: the weights and optimizer state are resharded exactly, "
                      "the dropout / drop-path random streams start anew (exact only up to them)")
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.dp_rank + 7919 * doc["step"])
        else:
            raise CheckpointError(
                f"{files.path} was written by a run of {len(rngs)} process(es) and this one "
                f"has {self.world.size}; resume with the same number to continue exactly")
        self.step = doc["step"]
        self.skipped_steps = doc.get("skipped_steps", 0)
        self.best = doc.get("best", {})
        self.resumed_from = self.step

    # ------------------------------------------------------------------ re-tokenization
    def _retokenize_phases(self) -> list[tuple[int, int, int, float]]:
        """[(first step, stride, dilation, forward FLOPs per image), ...]; one phase (the
        model as built) without a schedule."""
        from vitscale.models.asvit import AsViT, asvit_counts
        from vitscale.models.counts import count

        cfg, model = self.cfg, self.model
        if isinstance(model, AsViT):
            img = cfg.data.img_size

            def flops(stride: int) -> float:
                return asvit_counts(model.cfg, img, stride=stride).flops

            default = (model.cfg.tokenizer_stride, model.cfg.tokenizer_dilation)
        else:
            if cfg.retokenize:
                raise UserError("retokenize needs an As-ViT model (model.name=asvit-...); a "
                                "ViT's patch embedding has no stride/dilation schedule")
            return [(0, 0, 0, self.objective.forward_flops(model, count(model.cfg).flops))]
        if not cfg.retokenize:
            return [(0, *default, flops(default[0]))]
        return [(int(round(start * self.total)), int(stride), int(dilation), flops(int(stride)))
                for start, stride, dilation in cfg.retokenize]

    def _phase(self, step: int) -> tuple[int, int, int, float]:
        return [p for p in self.phases if p[0] <= step][-1]

    def train_flops(self, steps: int) -> tuple[float, float]:
        """(training FLOPs spent in the first `steps` steps, the same at the final
        tokenization): 3 x forward FLOPs (forward + backward) x images."""
        spent = 0.0
        bounds = [p[0] for p in self.phases[1:]] + [max(steps, self.phases[-1][0])]
        for (start, *_, flops), end in zip(self.phases, bounds):
            spent += max(min(end, steps) - start, 0) * flops
        images = 3 * self.cfg.data.batch_size
        return spent * images, steps * self.phases[-1][3] * images

    def _set_tokenizer(self, step: int) -> None:
        if not self.cfg.retokenize:
            return
        _, stride, dilation, _ = self._phase(step)
        for model in (self.model, self.ema.module if self.ema else None):
            if model is not None:
                model.set_tokenizer(stride, dilation)

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """One optimizer step on this process's share of the global batch: (its mean loss,
        its correct predictions (0-d tensors left on the device, summed over processes on log
        steps only), how many predictions were counted), or None when the loss or gradient is
        not finite. The one host synchronisation per step is that verdict. `clean`: the same
        examples un-augmented, for an objective that asks for them (a fixed teacher)."""
        from vitscale.data.mixing import mix_batch

        cfg = self.cfg
        if self.objective.uses_labels:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            x, targets, lam = mix_batch(x, y, self.data.num_classes, gen, self.data.mixup_alpha,
                                        cfg.data.cutmix_alpha, with_lam=True)
        else:  # mpp / mae: the labels (if any) are not read
            targets, lam = y, 1.0
        x = x.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if clean is not None:
            clean = clean.to(self.device, non_blocking=True)
        prepared = self.objective.prepare(x, targets, clean, lam, self.step)
        model = self.train_model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        counted = 0
        parts = prepared.chunk(cfg.accum_steps) if prepared is not None else [None] * cfg.accum_steps
        chunks = list(zip(x.chunk(cfg.accum_steps), targets.chunk(cfg.accum_steps), parts))
        for i, (xs, ts, ps) in enumerate(chunks):
            # Gradients are reduced across processes on the last micro-batch only.
            with self._gradient_sync(i == len(chunks) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=cfg.precision == "bf16"):
                    loss, hits, count = self.objective.loss(model, xs, ts, ps)
                loss = loss / cfg.accum_steps
                loss.backward()
            total_loss += loss.detach()
            if hits is not None:
                correct += hits
                counted += int(count)
        self._reduce_extra_grads()
        norm = self._grad_norm()
        # With several processes the verdict is the global gradient norm's (the same number in
        # every process; a non-finite loss anywhere makes it non-finite).
        finite = torch.isfinite(norm)
        if not self.world.distributed:
            finite &= torch.isfinite(total_loss)
        if not bool(finite):
            return None
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step if cfg.ema_warmup else None)
        return total_loss, correct, counted

    def _gradient_sync(self, sync: bool):
        """Reduce gradients across processes in this backward pass or not (accumulation)."""
        if sync or not self.world.distributed:
            return contextlib.nullcontext()
        if self.layout.sharded:
            return _fsdp_sync_off(self.model)
        return self.train_model.no_sync()

    def _reduce_extra_grads(self) -> None:
        """The objective's own parameters (not under DDP): gradients averaged over processes."""
        if self.extras is None or not self.world.distributed:
            return
        import torch.distributed as dist

        for p in self.extras.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world.size

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, after clipping to optim.grad_clip when set."""
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.extras is not None:  # unsharded runs only (objectives.build_objective)
            params += [p for p in self.extras.parameters() if p.grad is not None]
        if self.layout.sharded:
            from vitscale.parallel import clip_grad_norm

            return clip_grad_norm(params, clip)
        if clip:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        from vitscale.optim import apply_lr

        cfg = self.cfg
        started = time.perf_counter()
        main = self.world.is_main
        log = MetricsLog(self.run_dir, self.resumed_from) if main else None
        per_epoch = max(len(self.data.train) // cfg.data.batch_size, 1)
        eval_every = cfg.eval_every or per_epoch
        ckpt_every = cfg.ckpt_every or per_epoch
        progress = _Progress(cfg.progress and main, self.total, self.step)
        window_start, window_images, window_correct, window_counted = time.perf_counter(), 0, 0, 0
        last: dict[str, Any] = {}
        minival: dict[str, Any] = {}  # the last minival evaluation (of the final weights at the end)
        try:
            # Each data-parallel rank loads its slice of the global batch; the processes of a
            # tensor-parallel group load the same one.
            dp = World(rank=self.dp_rank, size=self.layout.replicas)
            batches = self.data.train_batches(start_step=self.step, batch_size=cfg.data.batch_size,
                                              shard=dp.shard(cfg.data.batch_size),
                                              clean_view=self.objective.needs_clean_view)
            for step, _epoch, x, y, *clean in batches:
                if step >= self.total:
                    break
                self.step = step
                self._set_tokenizer(step)
                lr = apply_lr(self.optimizer, step, self.total, cfg.optim.lr, cfg.schedule)
                outcome = self._train_step(x, y, clean[0] if clean else None)
                loss = outcome[0] if outcome is not None else None
                if outcome is not None:
                    window_correct = window_correct + outcome[1]
                    window_counted += outcome[2]
                else:
                    if cfg.on_nonfinite == "stop":
                        raise TrainingError(
                            f"non-finite loss or gradient at step {step}; lower optim.lr, enable "
                            "optim.grad_clip, or set on_nonfinite=skip to skip such steps")
                    self.skipped_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.skipped_steps > cfg.max_skipped_fraction * self.total:
                        raise TrainingError(
                            f"{self.skipped_steps} of the first {step + 1} steps had a non-finite "
                            f"loss or gradient, more than max_skipped_fraction="
                            f"{cfg.max_skipped_fraction:g} of {self.total} steps; lower optim.lr "
                            "or enable optim.grad_clip (or raise max_skipped_fraction)")
                self.step = step + 1
                window_images += cfg.data.batch_size
                done = self.step
                if done % cfg.log_every == 0 or done == self.total:
                    # The only cross-process reduction of the training metrics: on log steps.
                    step_loss, correct, counted = all_sum(
                        [loss if loss is not None else math.nan, window_correct, window_counted],
                        self.world, self.device)
                    now = time.perf_counter()
                    last = dict(step=done, epoch=round(done / per_epoch, 4),
                                images_seen=done * cfg.data.batch_size, lr=lr,
                                loss=step_loss / self.world.size)
                    if counted:  # a tensor-parallel group's duplicate counts cancel out
                        last["accuracy"] = correct / counted
                    last.update(images_per_s=window_images / max(now - window_start, 1e-9),
                                skipped_steps=self.skipped_steps,
                                skipped_images=self.data.skipped)
                    last.update(self._flops_record(done))
                    _write(log, last)
                    window_start, window_images, window_correct, window_counted = now, 0, 0, 0
                progress.update(done, last)
                if done % eval_every == 0 or done == self.total:
                    record = minival = self._evaluate("minival", done)
                    self._track_best(record)
                    _write(log, record)
                fewshot_every = cfg.evals.fewshot.every
                if fewshot_every and (done % fewshot_every == 0 or done == self.total):
                    _write(log, self._fewshot(done))
                if done % ckpt_every == 0 or done == self.total:
                    self._save()
            self._set_tokenizer(max(self.step - 1, 0))  # the last phase's, also after a resume
            if minival.get("step") != self.step:  # resumed after the last step: nothing ran
                minival = self._evaluate("minival", self.step)
            final = self._evaluate("test", self.step)
            final.update({f"last/{k}": v for k, v in minival.items() if k.endswith("/accuracy")})
            final.update({f"best/{k}": v for k, v in self.best.items()})
            final.update(self._flops_record(self.step))
            _write(log, final)
        finally:
            progress.close()
            if log is not None:
                log.close()
        self._save_final()
        if main:
            if self.data.skipped:
                print(f"skipped {self.data.skipped} unreadable images")
            if self.skipped_steps:
                print(f"skipped {self.skipped_steps} of {self.total} steps (non-finite loss or "
                      "gradient)")
        distributed.barrier(self.world)
        result = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        return RunResult(self.run_dir, self.step, result, time.perf_counter() - started, main,
                         cfg.objective)

    def _save_final(self) -> None:
        """model/ (and model_ema/): consolidated safetensors folders that models.load reads;
        from a sharded run gathered to rank 0's CPU, which writes them."""
        from vitscale.models.weights import save_state

        for name, model in (("model", self.model), ("model_ema", self.ema.module if self.ema else None)):
            if model is None:
                continue
            if self.layout.sharded:
                from vitscale.parallel.state import full_state

                state = full_state(model)  # every process takes part
            else:
                state = model.state_dict() if self.world.is_main else {}
            if self.world.is_main:
                save_state(model.cfg, state, self.run_dir / name)

    def _eval_loader(self, split: str):
        """This data-parallel rank's share of `split`, one loader per split for the whole run
        (its workers persist); the processes of a tensor-parallel group share one."""
        if split not in self._eval_loaders:
            self._eval_loaders[split] = self.data.eval_loader(
                split, self.cfg.data.eval_batch_size, shard=(self.dp_rank, self.layout.replicas))
        return self._eval_loaders[split]

    def _evaluate(self, split: str, step: int) -> dict[str, Any]:
        loader = self._eval_loader(split)
        record = self._record(step, split)
        if loader is None:
            return record
        lockstep = None
        if self.layout.sharded:  # every process must run as many forward passes (collectives)
            split_size = {"minival": self.data.minival, "test": self.data.test}[split]
            per_rank = -(-len(split_size) // self.layout.replicas)
            lockstep = -(-per_rank // self.cfg.data.eval_batch_size)
        for prefix, model in (("", self.model), ("ema/", self.ema.module if self.ema else None)):
            if model is None:
                continue
            metrics = self.objective.evaluate(model, loader, self.device, self.cfg.precision,
                                              self.world, copies=self.layout.tp)
            observer = None
            if metrics is None:  # the classification evaluator
                observer = self.objective.observer(split) if not prefix else None
                metrics = evaluate(model, loader, self.device, self.cfg.precision, self.world,
                                   self.cfg.loss, copies=self.layout.tp, lockstep=lockstep,
                                   observe=observer)
            for key in ("accuracy", "loss"):
                if key in metrics:
                    record[f"{prefix}{split}/{key}"] = metrics[key]
            if observer is not None:
                record.update(observer.metrics(self.world, self.device, self.layout.tp))
        self._after_forward_only()
        return record

    def _after_forward_only(self) -> None:
        """A sharded model's parameters back to shards after evaluation (see parallel.reshard)."""
        if self.layout.sharded:
            from vitscale.parallel import reshard

            for model in (self.model, self.ema.module if self.ema else None):
                if model is not None:
                    reshard(model)

    def _fewshot(self, step: int) -> dict[str, Any]:
        """Few-shot accuracies of the current weights (computed by the main process; by every
        process alike when the model is sharded, since each forward pass is collective)."""
        from vitscale.eval.api import fewshot_model

        fs = self.cfg.evals.fewshot
        record = self._record(step, "fewshot")
        if self.world.is_main or self.layout.sharded:
            if self._fewshot_data is None:
                self._fewshot_data = self.data
                if fs.source and fs.source != self.cfg.data.source:
                    from vitscale.config import DataConfig
                    from vitscale.data import build_data

                    self._fewshot_data = build_data(DataConfig(
                        source=fs.source, root=self.cfg.data.root, img_size=self.cfg.data.img_size,
                        augment="none", eval_batch_size=self.cfg.data.eval_batch_size), self.cfg.seed)
            out = fewshot_model(self.model, self._fewshot_data, fs.shots, fs.seeds, fs.l2,
                                device=self.device)
            for r in out["results"]:
                record[f"fewshot/{r['shots']}shot"] = r["mean"]
                record[f"fewshot/{r['shots']}shot_std"] = r["std"]
        self._after_forward_only()
        distributed.barrier(self.world)
        return record

    def _flops_record(self, steps: int) -> dict[str, Any]:
        spent, full = self.train_flops(steps)
        record: dict[str, Any] = {"train_flops": spent}
        if self.cfg.retokenize:
            _, stride, dilation, _ = self._phase(max(steps - 1, 0))
            record.update(train_flops_full=full, flops_saved=1 - spent / full if full else 0.0,
                          tokenizer=[stride, dilation])
        return record

    def _record(self, step: int, split: str) -> dict[str, Any]:
        per_epoch = max(len(self.data.train) // self.cfg.data.batch_size, 1)
        # Training compute and model size with every evaluation: the points of a scaling law
        # (vitscale scaling fit reads them).
        return {"step": step, "epoch": round(step / per_epoch, 4),
                "images_seen": step * self.cfg.data.batch_size, "split": split,
                "train_flops": self.train_flops(step)[0], "params": self.params}

    def _track_best(self, record: dict[str, Any]) -> None:
        """Remember the best minival accuracy (raw or EMA weights) and its step: model selection
        by upstream validation, as AugReg recommends."""
        for key in ("minival/accuracy", "ema/minival/accuracy"):
            if key in record and record[key] > self.best.get(key, -1.0):
                self.best[key] = record[key]
                self.best[f"{key}@step"] = record["step"]

    def _save(self) -> None:
        state = {"skipped_steps": self.skipped_steps, "best": self.best}
        rngs = distributed.gather_objects(rng_state(), self.world)
        if self.world.distributed:
            state["rng_per_process"] = rngs  # each process resumes its own dropout stream
        ema = self.ema.module if self.ema else None
        if self.layout.sharded:  # every process writes its shards
            save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                    ema=ema, keep=self.cfg.keep_checkpoints, world=self.world)
        elif self.world.is_main:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, ema=ema,
                            keep=self.cfg.keep_checkpoints, extras=self.extras)
        distributed.barrier(self.world)


@contextlib.contextmanager
def _fsdp_sync_off(model: torch.nn.Module):
    """No gradient reduce-scatter in this backward pass (FSDP2); a TP-only model has none."""
    toggle = getattr(model, "set_requires_gradient_sync", None)
    if toggle is None:
        yield
        return
    toggle(False)
    try:
        yield
    finally:
        toggle(True)


def _warn(message: str) -> None:
    print(f"vitscale: warning: {message}", file=sys.stderr)


def _write(log: MetricsLog | None, record: dict[str, Any]) -> None:
    if log is not None:  # only the main process logs
        log.write(record)


class _Progress:
    """A rich progress bar (step, loss, lr, images/s, ETA) or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            transient=False)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, done: int, last: dict[str, Any]) -> None:
        if self.bar is None:
            return
        info = ""
        if last:
            info = (f"loss {last['loss']:.4f}  lr {last['lr']:.2e}  "
                    f"{last['images_per_s']:.0f} img/s")
        self.bar.update(self.task, completed=done, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
