"""Checkpoint-level evaluation: what `vitscale eval | fewshot | linear-probe | select` run.
Every function takes any checkpoint `vitscale.models.load` reads (a vitscale run directory too)
and any `data.source`. Fine-tuning is training (`vitscale.train.finetune`): this package never
imports the trainer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitscale.config import PRETRAINING_OBJECTIVES, DataConfig
from vitscale.errors import CheckpointError, DataError
from vitscale.eval.classify import classification_metrics, reliability_diagram
from vitscale.eval.features import FeatureCache, Features, extract
from vitscale.eval.fewshot import DEFAULT_L2, DEFAULT_SEEDS, DEFAULT_SHOTS, FewShotResult, fewshot_eval
from vitscale.eval.linear_probe import DEFAULT_WDS, ProbeResult, linear_probe
from vitscale.utils.io import atomic_write_text


def resolve_checkpoint(path: str | Path) -> str:
    """A training run directory stands for its final weights (`RUN/model`)."""
    text = str(path)
    if text.startswith("hf-hub:"):
        return text
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").is_file():
        _note_pretraining(p)
        return str(p / "model")
    return text


_NOTED: set[str] = set()


def _note_pretraining(run_dir: Path) -> None:
    """One line, once per run and process, when a pre-training run's encoder is read: its
    objective's own parameters (mask embedding, prediction head, decoder) are not part of it."""
    import sys

    import yaml

    key = str(run_dir.resolve())
    config = run_dir / "config.yaml"
    if key in _NOTED or not config.is_file():
        return
    try:
        objective = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("objective")
    except (yaml.YAMLError, OSError, AttributeError):
        return
    if objective in PRETRAINING_OBJECTIVES:
        _NOTED.add(key)
        print(f"vitscale: note: {run_dir} was pre-trained with objective={objective}; its encoder "
              f"({run_dir / 'model'}) is used, the {objective} mask embedding / head / decoder are "
              "dropped", file=sys.stderr)


def load_model(checkpoint: str | Path, img_size: int | None = None, patch: int | None = None,
               **overrides: Any):
    """The model of `checkpoint`, at `img_size` when given (position embeddings resampled to the
    new grid), with `patch`-sized patches when given (kernel PI-resized, FlexiViT)."""
    from vitscale.models import load

    if img_size:
        overrides["img_size"] = img_size
    if patch:
        overrides["patch"] = patch
    return load(resolve_checkpoint(checkpoint), **overrides)


def square_size(model) -> int:
    h, w = model.cfg.img_size
    if h != w:
        raise DataError(f"the model takes {h}x{w} images; evaluation data are square, pass "
                        "--img-size to rebuild it at a square size")
    return h


def eval_data(model, source: str, batch_size: int = 256, minival_fraction: float = 0.1,
              root: str = "data"):
    """The splits of `source` at the model's resolution, with eval transforms only."""
    from vitscale.data import build_data

    cfg = DataConfig(source=source, root=root, img_size=square_size(model), augment="none",
                     eval_batch_size=batch_size, minival_fraction=minival_fraction)
    return build_data(cfg, seed=0)


def _data_key(data, split: str) -> dict[str, Any]:
    c = data.cfg
    return {"source": c.source, "root": c.root, "img_size": c.img_size, "split": split,
            "minival_fraction": c.minival_fraction, "resize_only": data.resize_only}


def split_features(model, data, split: str, cache: FeatureCache | None = None,
                   device: str = "cpu") -> Features:
    """Features of one split (cached by (weights, data) when a cache is given)."""
    loader = data.eval_loader(split)
    if loader is None:
        raise DataError(f"data.source={data.cfg.source} has no {split} split")

    def compute() -> Features:
        return extract(model, loader, device)

    return cache.get(model, _data_key(data, split), compute) if cache else compute()


def test_split(data) -> str:
    """The held-out split results are reported on: test, else minival."""
    if data.test is not None and len(data.test):
        return "test"
    if data.minival is not None:
        return "minival"
    raise DataError(f"data.source={data.cfg.source} has neither a test split nor a minival slice")


def check_classes(model, data) -> None:
    if model.cfg.num_classes != data.num_classes:
        raise CheckpointError(
            f"the checkpoint's head has {model.cfg.num_classes} classes but {data.cfg.source} has "
            f"{data.num_classes}; fine-tune it (vitscale finetune) or evaluate its features "
            "(vitscale fewshot / linear-probe)")


# ---------------------------------------------------------------------------------- eval
def output_dir_for(checkpoint: str | Path) -> Path | None:
    """Where files about a checkpoint go by default: its training run directory (for RUN, RUN/model
    or RUN/model_ema), else the checkpoint's folder, else the folder holding the weights file;
    None for an `hf-hub:` reference (nowhere of the user's)."""
    if str(checkpoint).startswith("hf-hub:"):
        return None
    path = Path(resolve_checkpoint(checkpoint))
    if path.is_file():
        path = path.parent
    if path.name in ("model", "model_ema") and (path.parent / "config.yaml").is_file():
        path = path.parent
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def evaluate_checkpoint(checkpoint: str | Path, source: str, img_size: int | None = None,
                        split: str | None = None, batch_size: int = 256,
                        out_dir: str | Path | None = None, device: str = "cpu",
                        loss: str = "softmax", patch: int | None = None) -> dict[str, Any]:
    """top1 / top5, per-class accuracy, ECE (15 bins), images/s. With `out_dir`: the metrics as
    `eval-<data>-<split>-<img>px.json` and the reliability diagram beside it as `.png`."""
    metrics = evaluate_model(load_model(checkpoint, img_size, patch), source, split, batch_size,
                             device, loss)
    metrics = {"checkpoint": str(checkpoint), **metrics}
    if out_dir is not None:
        stem = Path(out_dir) / f"eval-{_slug(source)}-{metrics['split']}-{metrics['img_size']}px"
        png, doc = stem.with_suffix(".png"), stem.with_suffix(".json")
        reliability_diagram(metrics["reliability"], png,
                            f"{Path(str(checkpoint)).name} on {source} ({metrics['split']}): "
                            f"ECE {metrics['ece']:.3f}")
        metrics.update(reliability_png=str(png), json=str(doc))
        atomic_write_text(doc, json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_model(model, source: str, split: str | None = None, batch_size: int = 256,
                   device: str = "cpu", loss: str = "softmax") -> dict[str, Any]:
    """evaluate_checkpoint's metrics for a model in memory (one changed after loading, say)."""
    data = eval_data(model, source, batch_size)
    check_classes(model, data)
    split = split or test_split(data)
    feats = split_features(model, data, split, device=device)
    metrics = classification_metrics(feats.logits, feats.labels, data.num_classes, loss=loss)
    metrics.update(data=source, split=split, img_size=square_size(model),
                   patch=getattr(model.cfg, "patch", None), images_per_s=feats.images_per_s)
    metrics["per_class"] = {data.class_names[c]: acc for c, acc in metrics["per_class"].items()}
    return metrics


# ---------------------------------------------------------------------------------- few-shot
def fewshot_features(model, data, cache: FeatureCache | None, device: str = "cpu"):
    train = split_features(model, data, "train", cache, device)
    test = split_features(model, data, test_split(data), cache, device)
    return train, test


def fewshot_checkpoint(checkpoint: str | Path, source: str, shots: Sequence[int] = DEFAULT_SHOTS,
                       seeds: int = DEFAULT_SEEDS, l2: float | Sequence[float] = DEFAULT_L2,
                       img_size: int | None = None, cache: FeatureCache | None = None,
                       device: str = "cpu", patch: int | None = None) -> dict[str, Any]:
    """Few-shot accuracy (mean and std over seeds) for each number of shots."""
    model = load_model(checkpoint, img_size, patch)
    data = eval_data(model, source)
    return fewshot_model(model, data, shots, seeds, l2, cache, device)


def fewshot_model(model, data, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS,
                  l2: float | Sequence[float] = DEFAULT_L2, cache: FeatureCache | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    start = time.perf_counter()
    train, test = fewshot_features(model, data, cache, device)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    results: list[FewShotResult] = fewshot_eval(
        train.pooled.numpy(), train.labels.numpy(), test.pooled.numpy(), test.labels.numpy(),
        shots, seeds, l2, data.num_classes)
    return {"data": data.cfg.source, "results": [r.as_dict() for r in results],
            "features_s": features_s, "solve_s": time.perf_counter() - start,
            "num_train": len(train.labels), "num_test": len(test.labels)}


# ---------------------------------------------------------------------------------- probe
def linear_probe_checkpoint(checkpoint: str | Path, source: str, wds: Sequence[float] = DEFAULT_WDS,
                            img_size: int | None = None, cache: FeatureCache | None = None,
                            device: str = "cpu", patch: int | None = None) -> ProbeResult:
    """Logistic regression on frozen features, weight decay chosen on minival."""
    model = load_model(checkpoint, img_size, patch)
    data = eval_data(model, source)
    if data.minival is None:
        raise DataError(f"data.source={source} left no minival slice to choose the weight decay on")
    feats = {s: split_features(model, data, s, cache, device) for s in ("train", "minival")}
    test = split_features(model, data, test_split(data), cache, device)
    return linear_probe(feats["train"].pooled, feats["train"].labels, feats["minival"].pooled,
                        feats["minival"].labels, test.pooled, test.labels, data.num_classes, wds)


# ---------------------------------------------------------------------------------- select
def rank_checkpoints(checkpoints: Sequence[str | Path], source: str, by: str = "auto",
                     shots: int = 10, cache: FeatureCache | None = None,
                     device: str = "cpu") -> list[dict[str, Any]]:
    """Score each checkpoint on upstream validation: minival accuracy of its own head when its
    classes match `source` (by='minival'), else (or by='fewshot') `shots`-shot accuracy on
    `source`'s minival. Best first."""
    if by not in ("auto", "minival", "fewshot"):
        raise DataError(f"--by {by!r}: choose auto, minival or fewshot")
    rows = []
    for ckpt in checkpoints:
        model = load_model(ckpt)
        data = eval_data(model, source)
        if data.minival is None:
            raise DataError(f"data.source={source} left no minival slice to select on")
        use_head = by == "minival" or (by == "auto" and model.cfg.num_classes == data.num_classes)
        if use_head:
            check_classes(model, data)
            feats = split_features(model, data, "minival", cache, device)
            score = float((feats.logits.argmax(-1) == feats.labels).double().mean())
            metric = "minival accuracy"
        else:
            train = split_features(model, data, "train", cache, device)
            val = split_features(model, data, "minival", cache, device)
            res = fewshot_eval(train.pooled.numpy(), train.labels.numpy(), val.pooled.numpy(),
                               val.labels.numpy(), [shots], DEFAULT_SEEDS, DEFAULT_L2,
                               data.num_classes)[0]
            score, metric = res.mean, f"{shots}-shot minival accuracy"
        rows.append({"checkpoint": str(ckpt), "score": score, "metric": metric,
                     "params": model.num_params(), "model": model.cfg.name})
    return sorted(rows, key=lambda r: -r["score"])
