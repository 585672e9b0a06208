"""Evaluation and transfer: classification metrics and calibration, few-shot linear regression,
linear probes, fine-tuning and checkpoint selection (see `api` for the checkpoint-level calls)."""

from vitscale.eval.api import (
    evaluate_checkpoint,
    evaluate_model,
    fewshot_checkpoint,
    fewshot_model,
    finetune,
    finetune_config,
    finetune_sweep,
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
    "fewshot_checkpoint", "fewshot_eval", "fewshot_model", "finetune", "finetune_config",
    "finetune_sweep",
    "fit_probe", "linear_probe", "linear_probe_checkpoint", "load_model", "rank_checkpoints",
    "reliability_diagram",
]
