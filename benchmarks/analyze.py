"""`vitscale analyze`'s cost: all six analyses on a B/16-sized ViT (random init, 224 px, 10
classes) on the first N digits test images (up-sampled to 224 px), robustness on the same N.

    python benchmarks/analyze.py                       # 8 images, IG at 64 steps, 2 threads
    python benchmarks/analyze.py --ig-steps 16 --threads 2 --what distance,rollout

Prints the seconds of each analysis (model building and data loading not counted) and their sum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from vitscale.analysis import analyze_model, parse_what
from vitscale.eval.api import eval_data
from vitscale.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="B/16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", default="all")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, num_classes=10).eval()
    data = eval_data(model, "digits", batch_size=args.images)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = analyze_model(model, data, parse_what(args.what), images=args.images, out_dir=out,
                            ig_steps=args.ig_steps, robust_images=args.images)
        total = time.perf_counter() - start
    row = {"model": args.model, "img_size": args.img_size, "images": args.images,
           "ig_steps": args.ig_steps, "threads": args.threads, "params": model.num_params(),
           "seconds": {k: round(v, 2) for k, v in res["seconds"].items()},
           "total_s": round(total, 2)}
    if "ig" in res:
        row["ig_max_relative_gap"] = res["ig"]["max_relative_gap"]
    print(json.dumps(row))


if __name__ == "__main__":
    main()
