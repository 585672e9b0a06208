"""The (x, error) points of a scaling study, read from training runs or a CSV file.

A run directory's metrics.jsonl has a record for every evaluation, each with the training FLOPs
spent so far (`train_flops`), the images seen and the model's parameter count: so one run gives
a point per evaluation. Metrics: `SPLIT/error` is 1 - `SPLIT/accuracy` (split: minival, test,
ema/minival, ...), `fewshot/Kshot_error` is 1 - `fewshot/Kshot`; any other key is read as is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from vitscale.scaling.errors import ScalingError

X_AXES = {"compute": "train_flops", "params": "params", "images": "images_seen"}


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """The value of `metric` in one metrics.jsonl record (None when the record has none)."""
    if metric in record:
        return float(record[metric])
    if metric.endswith("/error"):
        acc = record.get(metric[: -len("error")] + "accuracy")
        return None if acc is None else 1.0 - float(acc)
    if metric.endswith("_error"):
        acc = record.get(metric[: -len("_error")])
        return None if acc is None else 1.0 - float(acc)
    return None


def run_dirs(source: Path) -> list[Path]:
    """Every training run under `source` (itself, or its sub-folders), sorted."""
    if (source / "metrics.jsonl").is_file():
        return [source]
    return sorted(p.parent for p in source.rglob("metrics.jsonl"))


def _run_points(run: Path, metric: str, x_axis: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    params = next((r["params"] for r in rows if "params" in r), None)
    points = []
    for r in rows:
        error = metric_value(r, metric)
        if error is None:
            continue
        x = r.get(X_AXES[x_axis], params if x_axis == "params" else None)
        if x is None:
            continue
        points.append({"x": float(x), "error": error, "run": str(run), "step": r.get("step"),
                       "params": params, "images": r.get("images_seen")})
    return points


def read_points(source: str | Path, metric: str = "minival/error",
                x_axis: str = "compute") -> list[dict[str, Any]]:
    """[{x, error, run, params, ...}] from a sweep / run directory or a CSV with columns
    `compute,error` (optionally `params,images`), or a one-line ScalingError."""
    if x_axis not in X_AXES:
        raise ScalingError(f"--x {x_axis!r} is not an axis; use {', '.join(X_AXES)}")
    path = Path(source)
    if path.suffix.lower() == ".csv":
        return _csv_points(path, x_axis)
    if not path.is_dir():
        raise ScalingError(f"{path}: no such sweep or run directory (or .csv file)")
    runs = run_dirs(path)
    if not runs:
        raise ScalingError(f"{path} holds no training runs (no metrics.jsonl); run vitscale "
                           "sweep or vitscale train into it first")
    points = [p for run in runs for p in _run_points(run, metric, x_axis)]
    if not points:
        raise ScalingError(f"no record of the {len(runs)} run(s) under {path} has {metric!r} "
                           f"with {X_AXES[x_axis]}; choose --metric (e.g. minival/error, "
                           "test/error, fewshot/10shot_error)")
    return points


def _csv_points(path: Path, x_axis: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ScalingError(f"{path}: no such CSV file")
    column = {"compute": "compute", "params": "params", "images": "images"}[x_axis]
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or {column, "error"} - set(reader.fieldnames):
            raise ScalingError(f"{path} needs the columns {column},error (has "
                               f"{','.join(reader.fieldnames or []) or 'none'})")
        points = []
        for i, row in enumerate(reader, start=2):
            try:
                x, error = float(row[column]), float(row["error"])
            except (TypeError, ValueError):
                raise ScalingError(f"{path} line {i}: {column}={row[column]!r}, "
                                   f"error={row['error']!r} are not numbers") from None
            params = float(row["params"]) if row.get("params") else None
            points.append({"x": x, "error": error, "run": str(path), "params": params})
    return points
