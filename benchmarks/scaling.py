"""A scaling study on digits: sweep -> saturating power-law fit -> prediction of the costliest runs.

    python benchmarks/scaling.py                       # 16 runs
    python benchmarks/scaling.py --out runs/scaling --jobs 2

The demo recipe (configs/demo.yaml, 16 px, 2x2 patches) at four sizes from 18k to 0.67M
parameters (width x depth: 32x2, 64x3, 96x4, 128x5; MLP 2x width, heads width / 16), each
trained for four budgets (4, 8, 16 and 32 epochs, cosine schedule to the end of each), evaluated
on minival every 32 steps: every evaluation is a point (training FLOPs so far, minival error).
Two changes to the demo recipe make the study measurable on digits: batch 16 (at the demo's 64,
runs shorter than ~12 epochs end near chance: the frontier is then a sigmoid, not a power law)
and 30% of the train split held out as minival (431 images: error steps of 0.23 points instead
of 0.69, and a less saturated task).
1. The law E = a (C + d)^-b + c is fitted to the Pareto frontier of the points whose compute
   lies in the cheaper two thirds of the compute range (log scale), then asked for the frontier
   error of the costliest third; reported: each frontier point's prediction error, the largest
   of them (the bar: 2 points of error), and the fit on all points with its intervals.
2. Sample efficiency (Scaling ViT's observation that larger models need fewer images for the
   same error): the minival error of each size's longest run against images seen.
Plots: OUT/fit-two-thirds.png, OUT/fit.png (all points), OUT/sample-efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from vitscale.scaling import fit_power_law, fit_runs, read_points, run_sweep
from vitscale.scaling.study import plot_fit

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SIZES = [(32, 2), (64, 3), (96, 4), (128, 5)]
EPOCHS = [4, 8, 16, 32]


def points_for() -> list[dict]:
    points = []
    for width, depth in SIZES:
        for epochs in EPOCHS:
            points.append({"overrides": {"model.overrides.width": width,
                                         "model.overrides.depth": depth,
                                         "model.overrides.mlp_dim": 2 * width,
                                         "model.overrides.heads": max(width // 16, 1),
                                         "epochs": epochs}, "star": None})
    return points


def sample_efficiency(out: Path, path: Path) -> dict[str, list]:
    from vitscale.scaling.sweep import point_name
    from vitscale.utils.plot import figure, save_png

    fig = figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    curves = {}
    for p in points_for():
        if p["overrides"]["epochs"] != EPOCHS[-1]:
            continue
        run = out / point_name(p["overrides"])
        pts = read_points(run, "minival/error", "images")
        label = f"{pts[0]['params'] / 1e3:,.0f}k params"
        curves[label] = [[q["x"], q["error"]] for q in pts]
        ax.plot([q["x"] for q in pts], [q["error"] for q in pts], ".-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images seen")
    ax.set_ylabel("minival error")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--minival-fraction", type=float, default=0.3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.jobs > 1 else "2")
    started = time.perf_counter()
    points = points_for()
    run_sweep(str(DEMO), points, args.out, jobs=args.jobs,
              overrides=["progress=false", "eval_every=32", f"data.batch_size={args.batch_size}",
                         f"data.minival_fraction={args.minival_fraction}"])
    print(f"sweep: {len(points)} runs in {time.perf_counter() - started:.0f} s", flush=True)

    everything = read_points(args.out, "minival/error", "compute")
    logs = np.log([p["x"] for p in everything])
    cut = math.exp(logs.min() + 2 / 3 * (logs.max() - logs.min()))
    x = np.array([p["x"] for p in everything])
    e = np.array([p["error"] for p in everything])
    cheap = x <= cut
    fit = fit_power_law(x[cheap], e[cheap], meta={"metric": "minival/error", "x_axis": "compute",
                                                  "x_unit": "training FLOPs"})
    plot_fit(fit, [p for p, c in zip(everything, cheap) if c], args.out / "fit-two-thirds.png")
    from vitscale.scaling.fit import pareto_frontier

    frontier = pareto_frontier(x, e)
    held = [i for i in frontier if x[i] > cut]
    errors = [float(fit.predict(x[i]) - e[i]) for i in held]
    print(f"fitted on {int(cheap.sum())} points up to {cut:.3g} FLOPs: "
          f"E = {fit.a:.4g} (C + {fit.d:.3g})^-{fit.b:.4g} + {fit.c:.4g}")
    for i, err in zip(held, errors):
        print(f"  frontier point {x[i]:.3g} FLOPs: error {e[i]:.4f}, predicted "
              f"{fit.predict(x[i]):.4f} ({100 * err:+.2f} points)")
    worst = max((abs(v) for v in errors), default=float("nan"))
    print(f"largest prediction error on the costliest third: {100 * worst:.2f} points "
          f"({len(held)} frontier points; bar 2 points)")
    whole, _, png = fit_runs(args.out, "minival/error", "compute", args.out)
    print(f"all points: E = {whole.a:.4g} (C + {whole.d:.3g})^-{whole.b:.4g} + {whole.c:.4g}; "
          "intervals " + ", ".join(f"{k} [{v[0]:.3g}, {v[1]:.3g}]" for k, v in whole.intervals.items()))
    curves = sample_efficiency(args.out, args.out / "sample-efficiency.png")
    (args.out / "benchmark.json").write_text(json.dumps({
        "cut_flops": cut, "two_thirds_fit": {k: getattr(fit, k) for k in "abcd"},
        "held_out": [{"flops": float(x[i]), "error": float(e[i]), "predicted": float(fit.predict(x[i]))}
                     for i in held],
        "worst_points": 100 * worst, "all_fit": {k: getattr(whole, k) for k in "abcd"},
        "sample_efficiency": curves, "wall_s": time.perf_counter() - started}, indent=1))
    print(f"plots: {args.out / 'fit-two-thirds.png'}, {png}, {args.out / 'sample-efficiency.png'}"
          f" ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
