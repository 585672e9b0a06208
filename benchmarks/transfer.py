"""Transfer evaluation figures: few-shot solver time, and the digits results table.

    python benchmarks/transfer.py                          # trains the demo recipe first (~2 min)
    python benchmarks/transfer.py --checkpoint runs/demo-20261123-015228
    python benchmarks/transfer.py --timing-only

1. Few-shot solver wall time on 10,000 cached train features and 10,000 test features
   (D = 768, 100 classes; shots 1, 5, 10, 25; 3 draws each): the cost of `vitscale fewshot`
   once features are cached.
2. On digits, for one checkpoint: its own test accuracy and ECE, few-shot accuracy (1/5/10
   shots, 3 draws, frozen features), the linear probe, and fine-tuning at 1.5x the resolution
   (accuracy before any step, with the position embeddings resampled, and after).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from vitscale.eval import (
    evaluate_checkpoint,
    fewshot_checkpoint,
    fewshot_eval,
    finetune,
    linear_probe_checkpoint,
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def solver_timing(n: int = 10_000, dim: int = 768, classes: int = 100) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim))
    y_train, y_test = rng.integers(0, classes, n), rng.integers(0, classes, n)
    x_train = centers[y_train] + 3 * rng.normal(size=(n, dim))
    x_test = centers[y_test] + 3 * rng.normal(size=(n, dim))
    print(f"few-shot solver: {n} train / {n} test features, D={dim}, {classes} classes, 3 draws\n")
    print("| shots | wall s (3 draws) | accuracy |")
    print("|---:|---:|---:|")
    for shots in (1, 5, 10, 25):
        start = time.perf_counter()
        (res,) = fewshot_eval(x_train, y_train, x_test, y_test, [shots], 3, 1024.0, classes)
        print(f"| {shots} | {time.perf_counter() - start:.2f} | {res.mean:.3f} |", flush=True)


def digits_table(checkpoint: str, img_size: int, finetune_steps: int) -> None:
    own = evaluate_checkpoint(checkpoint, "digits")
    src = own["img_size"]
    print(f"\ndigits, checkpoint {checkpoint} ({src} px)\n")
    print("| evaluation | test accuracy | notes |")
    print("|---|---:|---|")
    print(f"| own head, {src} px | {own['top1']:.4f} | ECE {own['ece']:.4f} |")
    with tempfile.TemporaryDirectory() as cache:
        from vitscale.eval import FeatureCache

        fs = fewshot_checkpoint(checkpoint, "digits", shots=[1, 5, 10], cache=FeatureCache(cache))
        for r in fs["results"]:
            print(f"| {r['shots']}-shot linear regression | {r['mean']:.4f} | std {r['std']:.4f} "
                  f"over {len(r['accuracies'])} draws, l2 {r['l2']:g} |")
        probe = linear_probe_checkpoint(checkpoint, "digits", cache=FeatureCache(cache))
        print(f"| linear probe | {probe.test_accuracy:.4f} | wd {probe.wd:g} chosen on minival |")
    before = evaluate_checkpoint(checkpoint, "digits", img_size=img_size)
    from vitscale.eval import load_model

    how = ("learned position embeddings resampled" if load_model(checkpoint).cfg.posemb == "learn"
           else "sin-cos positions measured on the trained grid")
    print(f"| own head at {img_size} px, before fine-tuning | {before['top1']:.4f} | {how} |")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = finetune(checkpoint, "digits", img_size=img_size, keep_head=True,
                          overrides=[f"steps={finetune_steps}", "progress=false",
                                     "data.crop_scale_min=1.0", f"out_dir={out}"])
        seconds = time.perf_counter() - start
    print(f"| fine-tuned at {img_size} px | {result.metrics['test/accuracy']:.4f} | "
          f"{finetune_steps} SGD steps, {seconds:.0f} s; EMA weights "
          f"{result.metrics.get('ema/test/accuracy', float('nan')):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a digits checkpoint or run directory (default: "
                        "train configs/demo.yaml)")
    parser.add_argument("--img-size", type=int, help="fine-tuning resolution (default 1.5x)")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    solver_timing()
    if args.timing_only:
        return
    checkpoint = args.checkpoint
    if checkpoint is None:
        from vitscale.train import run

        checkpoint = tempfile.mkdtemp(prefix="vitscale-demo-")
        run(str(DEMO), ["progress=false", f"out_dir={checkpoint}"])
    from vitscale.eval import load_model

    src = load_model(checkpoint).cfg.img_size[0]
    digits_table(checkpoint, args.img_size or src * 3 // 2, args.finetune_steps)


if __name__ == "__main__":
    main()
