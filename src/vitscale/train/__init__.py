"""Training: `run(config)` is what `vitscale train` calls."""

from vitscale.train.loop import RunResult, Trainer, TrainingError, loss_fn, run

__all__ = ["RunResult", "Trainer", "TrainingError", "loss_fn", "run"]
