"""Fine-tuning a checkpoint (`vitscale finetune`, `vitscale select`): a training run from
the ViT paper's transfer recipe, and the learning-rate sweep that picks a rate on minival.

It lives with the trainer because it is training: it uses the evaluators' checkpoint helpers,
and `vitscale.eval` never imports it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitscale.config import TrainConfig, load_config
from vitscale.errors import DataError
from vitscale.eval.api import load_model, resolve_checkpoint, square_size
from vitscale.train.loop import RunResult, run
from vitscale.utils.io import atomic_write_text

# The ViT paper's fine-tuning recipe: a new zero-initialised head, SGD with momentum 0.9, no
# weight decay, warmup then cosine, global-norm clipping at 1, Polyak averaging, no Mixup.
FINETUNE_DEFAULTS = [
    "model.reset_head=true", "model.overrides.head_zero_init=true",
    "data.augment=none", "data.crop_scale_min=0.08",
    "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9", "optim.weight_decay=0.0",
    "optim.grad_clip=1.0", "schedule.decay=cosine", "schedule.warmup_fraction=0.05",
    "loss=softmax", "ema_decay=0.999", "epochs=10",
]


def finetune_config(checkpoint: str | Path, source: str, img_size: int | None = None,
                    config: str | Path | None = None, overrides: Sequence[str] = (),
                    keep_head: bool = False, patch: int | None = None) -> TrainConfig:
    """The TrainConfig of a fine-tuning run: FINETUNE_DEFAULTS, then the YAML `config`, then
    `overrides` (later wins). `patch` changes the patch size (kernel PI-resized), e.g. to keep
    the token grid at a higher resolution."""
    ckpt = resolve_checkpoint(checkpoint)
    if img_size is None:
        img_size = square_size(load_model(ckpt))
    base = load_config(None, FINETUNE_DEFAULTS)
    if config is not None:
        base = load_config(config, [], base=base)
    fixed = [f"model.init={ckpt}", f"data.source={source}", f"data.img_size={img_size}"]
    if keep_head:
        fixed += ["model.reset_head=false"]
    if patch:
        fixed += [f"model.overrides.patch={patch}"]
    if not any(o.startswith("out_dir=") for o in overrides):
        fixed += [f"out_dir=runs/finetune-{Path(ckpt).parent.name or 'model'}-{img_size}px"]
    return load_config(None, [*fixed, *overrides], base=base)


def finetune(checkpoint: str | Path, source: str, img_size: int | None = None,
             config: str | Path | None = None, overrides: Sequence[str] = (),
             keep_head: bool = False, patch: int | None = None) -> RunResult:
    """Fine-tune `checkpoint` on `source` at `img_size`; a run directory like `vitscale train`."""
    return run(finetune_config(checkpoint, source, img_size, config, overrides, keep_head, patch))


def finetune_sweep(checkpoint: str | Path, source: str, lrs: Sequence[float],
                   img_size: int | None = None, config: str | Path | None = None,
                   overrides: Sequence[str] = (), keep_head: bool = False,
                   patch: int | None = None) -> tuple[RunResult, list[dict[str, Any]]]:
    """Fine-tune once per learning rate, each in OUT/lr-<lr>, and keep the run whose last weights
    score best on `source`'s minival: how the ViT paper picks its fine-tuning learning rate
    (ties: the first given). Returns that run and one row per rate; OUT/sweep.json records them."""
    if not lrs:
        raise DataError("--lr: give at least one learning rate")
    no_minival = DataError(f"data.source={source} leaves no minival slice to choose the learning "
                           "rate on; set data.minival_fraction > 0 or give one --lr")
    base = finetune_config(checkpoint, source, img_size, config, overrides, keep_head, patch)
    if base.data.minival_fraction <= 0:
        raise no_minival
    rows, best = [], None
    for lr in lrs:
        cfg = finetune_config(checkpoint, source, img_size, config,
                              [*overrides, f"optim.lr={lr}", f"out_dir={base.out_dir}/lr-{lr:g}"],
                              keep_head, patch)
        result = run(cfg)
        score = result.metrics.get("last/minival/accuracy")  # the run's own minival, last weights
        if score is None:
            raise no_minival
        rows.append({"lr": lr, "minival_accuracy": score, "run_dir": str(result.run_dir),
                     "test_accuracy": result.metrics.get("test/accuracy")})
        if best is None or score > rows[best[1]]["minival_accuracy"]:
            best = (result, len(rows) - 1)
    for i, row in enumerate(rows):
        row["chosen"] = i == best[1]
    if best[0].is_main:
        doc = {"chosen_lr": rows[best[1]]["lr"], "runs": rows}
        atomic_write_text(Path(base.out_dir) / "sweep.json", json.dumps(doc, indent=2))
    return best[0], rows
