"""`vitscale scaling fit | predict`: a fit of a sweep's runs written as fit.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vitscale.scaling.errors import ScalingError
from vitscale.scaling.fit import PowerLawFit, fit_power_law
from vitscale.scaling.points import read_points
from vitscale.utils.io import atomic_write_text

X_UNITS = {"compute": "training FLOPs", "params": "parameters", "images": "images seen"}


def fit_runs(source: str | Path, metric: str = "minival/error", x_axis: str = "compute",
             out: str | Path | None = None, bootstrap: int = 300,
             max_x: float | None = None) -> tuple[PowerLawFit, Path, Path]:
    """Fit the saturating law to every point of `source` (runs or a CSV), write fit.json and
    fit.png into `out` (default: the sweep directory, or beside the CSV). `max_x`: only points
    up to this x (e.g. to predict the rest)."""
    points = read_points(source, metric, x_axis)
    if max_x is not None:
        points = [p for p in points if p["x"] <= max_x]
    x = np.array([p["x"] for p in points])
    error = np.array([p["error"] for p in points])
    source = Path(source)
    meta = {"metric": metric, "x_axis": x_axis, "x_unit": X_UNITS[x_axis], "sources": str(source)}
    fit = fit_power_law(x, error, bootstrap=bootstrap, meta=meta)
    folder = Path(out) if out else (source.parent if source.suffix.lower() == ".csv" else source)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "fit.json"
    atomic_write_text(json_path, json.dumps(fit.to_dict(), indent=1))
    png = plot_fit(fit, points, folder / "fit.png")
    return fit, json_path, png


def plot_fit(fit: PowerLawFit, points: list[dict[str, Any]], path: Path) -> Path:
    """Log-log: every point (coloured by model size), the frontier, the law and its 90% band."""
    from vitscale.utils.plot import figure, save_png

    fig = figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    sizes = sorted({p["params"] for p in points if p.get("params")})
    cmap = _colours(len(sizes))
    for i, size in enumerate(sizes):
        xs = [p["x"] for p in points if p.get("params") == size]
        es = [p["error"] for p in points if p.get("params") == size]
        ax.scatter(xs, es, s=14, color=cmap[i], alpha=0.7, label=f"{size / 1e3:,.0f}k params")
    rest = [p for p in points if not p.get("params")]
    if rest:
        ax.scatter([p["x"] for p in rest], [p["error"] for p in rest], s=14, color="0.6",
                   label="points")
    ax.plot(fit.x, fit.error, "k.", ms=9, label="Pareto frontier")
    lo_x = max(min(p["x"] for p in points if p["x"] > 0), 1e-30)
    grid = np.geomspace(lo_x, max(p["x"] for p in points) * 10, 200)
    lo, hi = fit.band(grid)
    ax.fill_between(grid, lo, hi, color="C3", alpha=0.2, lw=0, label="90% band")
    ax.plot(grid, fit.predict(grid), "C3-", lw=1.5,
            label=f"{fit.a:.3g} (C + {fit.d:.3g})^-{fit.b:.3g} + {fit.c:.3g}")
    ax.axhline(fit.c, color="C3", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(fit.meta.get("x_unit", "compute"))
    ax.set_ylabel(fit.meta.get("metric", "error"))
    ax.legend(fontsize=7, loc="upper right")
    return save_png(fig, path)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def read_fit(path: str | Path) -> PowerLawFit:
    path = Path(path)
    if path.is_dir():
        path = path / "fit.json"
    if not path.is_file():
        raise ScalingError(f"{path}: no fit file; write one with vitscale scaling fit DIR")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ScalingError(f"{path} is not valid JSON; write it again with vitscale scaling "
                           "fit") from None
    return PowerLawFit.from_dict(doc)


# ---------------------------------------------------------------------------------- shape
def star_points(out: str | Path, metric: str = "minival/error") -> list[dict[str, Any]]:
    """A star sweep's points for `fit_shape`: each evaluation of each run as (dimension varied,
    its value, training FLOPs so far, error); the centre's runs count for every dimension."""
    from vitscale.scaling.sweep import SHAPE_KEYS, read_index

    header, rows = read_index(out)
    if not header.get("center"):
        raise ScalingError(f"{out} is a grid sweep; vitscale scaling shape needs a star sweep "
                           "(vitscale sweep --star width=W,depth=D,mlp_dim=M)")
    points = []
    for row in rows:
        run = Path(row["run_dir"])
        if not (run / "metrics.jsonl").is_file():
            continue
        dims = list(SHAPE_KEYS) if row["star"] == "center" else [row["star"]]
        for p in read_points(run, metric, "compute"):
            for dim in dims:
                points.append({"dim": dim, "x": float(row["overrides"][SHAPE_KEYS[dim]]),
                               "compute": p["x"], "error": p["error"]})
    if not points:
        raise ScalingError(f"no run of the star sweep {out} has finished an evaluation yet")
    return points


def shape_study(out: str | Path, compute: float, metric: str = "minival/error") -> dict[str, Any]:
    """Fit SoViT's per-dimension law to a star sweep; its exponents, the compute-optimal shape
    at `compute` and that shape as model overrides (the centre's head dimension kept)."""
    from vitscale.config import load_config
    from vitscale.scaling.shape import fit_shape, shape_overrides
    from vitscale.scaling.sweep import SHAPE_KEYS, override_list, read_index

    header, rows = read_index(out)
    fit = fit_shape(star_points(out, metric))
    optimal = fit.optimal(compute)
    center = next(r for r in rows if r["star"] == "center") if any(
        r["star"] == "center" for r in rows) else rows[0]
    cfg = load_config(header.get("config"), override_list(
        {k: v for k, v in center["overrides"].items() if k in SHAPE_KEYS.values()}))
    head_dim = cfg.model.build_config(10, cfg.data.img_size).head_dim
    settings = shape_overrides(optimal, head_dim)
    atomic_write_text(Path(out) / "shape.json", json.dumps(fit.to_dict(), indent=1))
    return {"exponents": fit.exponents(), "compute": compute, "optimal": optimal,
            "model.overrides": settings, "fit": str(Path(out) / "shape.json"),
            "config": header.get("config")}
