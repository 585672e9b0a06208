"""Evaluation: classification metrics and calibration, few-shot linear regression, linear probes
and checkpoint selection (see `api` for the checkpoint-level calls). Fine-tuning is training and
lives in `vitscale.train.finetune`; this package never imports the trainer."""

from vitscale.eval.api import (
    evaluate_checkpoint,
    evaluate_model,
    fewshot_checkpoint,
    fewshot_model,
    linear_probe_checkpoint,
    load_model,
    rank_checkpoints,
)
from vitscale.eval.classify import classification_metrics, expected_calibration_error, reliability_diagram
from vitscale.eval.features import FeatureCache, Features, extract
from vitscale.eval.fewshot import FewShotResult, RidgeSolver, fewshot_eval
from vitscale.eval.linear_probe import ProbeResult, fit_probe, linear_probe

__all__ = [
    "FeatureCache", "Features", "FewShotResult", "ProbeResult", "RidgeSolver",
    "classification_metrics", "evaluate_checkpoint", "evaluate_model", "expected_calibration_error",
    "extract",
    "fewshot_checkpoint", "fewshot_eval", "fewshot_model",
    "fit_probe", "linear_probe", "linear_probe_checkpoint", "load_model", "rank_checkpoints",
    "reliability_diagram",
]

_MOVED_TO_TRAIN = ("finetune", "finetune_config", "finetune_sweep", "FINETUNE_DEFAULTS")


def __getattr__(name: str):
    # The fine-tuning names that lived here before they moved to vitscale.train.finetune keep
    # working for existing code; resolved only when asked for, so importing vitscale.eval never
    # imports the trainer.
    if name in _MOVED_TO_TRAIN:
        import importlib
        import warnings

        warnings.warn(f"vitscale.eval.{name} moved to vitscale.train.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module("vitscale.train.finetune"), name)
    raise AttributeError(f"module 'vitscale.eval' has no attribute {name!r}")
