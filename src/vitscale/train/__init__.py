"""Training: `run(config)` is what `vitscale train` calls; `finetune` / `finetune_sweep` what
`vitscale finetune` calls."""

from vitscale.train.finetune import FINETUNE_DEFAULTS, finetune, finetune_config, finetune_sweep
from vitscale.train.loop import RunResult, Trainer, TrainingError, loss_fn, run

__all__ = ["FINETUNE_DEFAULTS", "RunResult", "Trainer", "TrainingError", "finetune",
           "finetune_config", "finetune_sweep", "loss_fn", "run"]
