"""Detection on the generated shapes set: AP50 of a tiny ViT Faster R-CNN on its training images.

    python benchmarks/detect.py                       # configs/detect-shapes.yaml, 32 images
    python benchmarks/detect.py --images 32 --steps 600 --threads 1

Generates the shapes set (vitscale.detection.synthetic, seed 0, 128 px), trains
configs/detect-shapes.yaml from scratch (`vitscale detect train`) and reports COCO box AP, AP50
and AP75 on the training images (pycocotools) with the wall time of the run, evaluation
included. The issue's bar: AP50 >= 0.9 within 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitscale.detection.synthetic import make_shapes
from vitscale.detection.train import train_detector

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detect-shapes.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 on a shared 2-core machine: two oversubscribe it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_shapes(Path(tmp) / "shapes", args.images, 128, seed=args.seed)
        out = args.out or str(Path(tmp) / "run")
        started = time.perf_counter()
        result = train_detector(CONFIG, [f"data.train={source}", f"steps={args.steps}",
                                         f"seed={args.seed}", f"out_dir={out}", "progress=false"])
        wall = time.perf_counter() - started
    row = {"images": args.images, "steps": args.steps, "threads": args.threads,
           "ap": round(result.metrics["ap"], 4), "ap50": round(result.metrics["ap50"], 4),
           "ap75": round(result.metrics["ap75"], 4), "wall_s": round(wall, 1)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
