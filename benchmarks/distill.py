"""Distillation on digits: a 4x smaller student taught by the demo recipe's model.

    python benchmarks/distill.py                      # seeds 0 1 2, about 25 minutes on 2 cores
    python benchmarks/distill.py --seeds 0 --epochs 10
    python benchmarks/distill.py --temperature 4 --arms labels distill fixed

The teacher is `configs/demo.yaml` as `make demo` trains it (seed 0). The student is the same
recipe at width 48 and MLP 96 (the teacher: 96 and 192), so its blocks have 4x fewer parameters.
Per seed, the student trains for the teacher's number of steps:
- `labels`: on the labels (the demo recipe's label smoothing 0.1);
- `distill`: function matching (`vitscale distill`, t = 1), the teacher online on the student's
  batch (consistent);
- `fixed`: the same with `distill.consistent=false`, the teacher on each example's centre crop
  (the precomputed-teacher baseline of "Knowledge distillation: a good teacher is patient and
  consistent");
- `distill+mixup`: function matching with Mixup, lambda uniform (data.mixup_alpha=1: Beta(1, 1),
  the paper's choice; mixing example i with i-1 makes lambda and 1 - lambda the same draw).
Reported: test accuracy, top-1 agreement with the teacher, the KL on the test split, mean and
standard deviation over the seeds, and the wall time per run (this machine's, a ratio only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vitscale.config import load_config
from vitscale.models import count
from vitscale.train import run

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STUDENT = ["model.overrides.width=48", "model.overrides.mlp_dim=96"]


def arms(teacher: Path, temperature: float = 1.0) -> dict[str, list[str]]:
    teach = ["objective=distill", f"distill.teachers=[{teacher / 'model'}]",
             f"distill.temperature={temperature:g}"]
    return {"labels": [], "distill": teach, "fixed": [*teach, "distill.consistent=false"],
            "distill+mixup": [*teach, "data.mixup_alpha=1.0"]}


def stat(rows: list[dict], key: str) -> str:
    """'mean ± sd' of rows[key] over the seeds ('-' when the arm has no such number)."""
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, help="default: the demo recipe's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-distill"))
    parser.add_argument("--arms", nargs="+", help="default: all four")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="distill.temperature of the distilled arms (default 1)")
    args = parser.parse_args()
    common = ["progress=false"] + ([f"epochs={args.epochs}"] if args.epochs else [])
    teacher = args.out / "teacher"
    started = time.perf_counter()
    t_res = run(load_config(DEMO, [*common, f"out_dir={teacher}"]))
    print(f"teacher: test accuracy {t_res.metrics['test/accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    t_cfg = load_config(teacher / "config.yaml").model.build_config(10, 16)
    s_cfg = load_config(DEMO, STUDENT).model.build_config(10, 16)
    print(f"parameters: teacher {count(t_cfg).params:,}, student {count(s_cfg).params:,} "
          f"({count(t_cfg).params / count(s_cfg).params:.2f}x)")
    names = args.arms or list(arms(teacher))
    tag = "" if args.temperature == 1.0 else f"-t{args.temperature:g}"  # the labels run is shared
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            t = time.perf_counter()
            out = args.out / f"{name}{tag if name != 'labels' else ''}-seed{seed}"
            m = run(load_config(DEMO, [*common, *STUDENT, *arms(teacher, args.temperature)[name],
                                       f"seed={seed}", f"out_dir={out}"])).metrics
            row = {"seed": seed, "accuracy": m["test/accuracy"], "agreement": m.get("test/agreement"),
                   "kl": m.get("test/kl"), "wall_s": time.perf_counter() - t}
            results[name].append(row)
            print(name, json.dumps(row), flush=True)
    print(f"\n| student ({len(args.seeds)} seeds) | test accuracy | agreement | test KL | wall s |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        cells = [stat(rows, key) for key in ("accuracy", "agreement", "kl")]
        wall = statistics.mean(r["wall_s"] for r in rows)
        print(f"| {name} | {' | '.join(cells)} | {wall:.0f} |")
    print(f"| teacher (seed 0) | {t_res.metrics['test/accuracy']:.4f} | | | |")
    (args.out / "results.json").write_text(json.dumps(
        {"teacher_accuracy": t_res.metrics["test/accuracy"], "results": results}, indent=1))


if __name__ == "__main__":
    main()
