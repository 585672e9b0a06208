"""What As-ViT's training-free design costs on this machine.

    python benchmarks/search_cost.py                        # per-candidate times only
    python benchmarks/search_cost.py --steps 100 --targets 30M,50M,90M --out runs/search-cost

1. Wall time of L^E and of the NTK condition number for one candidate (the seed topology, one
   block per stage, C = 32; --repeats initialisations each, NTK on --batch images, --n-theta
   points on the circle: by default those of `vitscale search`) at several image sizes.
2. With --steps: a whole `vitscale search` of that many steps, then `vitscale autoscale` of its
   topology to --targets, both timed (the paper: about 12 V100 GPU-hours end to end, 500
   search steps at 224 px).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vitscale.models.asvit import SEED, AsViTConfig, create_asvit
from vitscale.search.autoscale import ScaleSettings, autoscale, parse_sizes
from vitscale.search.complexity import curve_length, ntk_condition_number
from vitscale.search.reinforce import SearchSettings, run_search


def per_candidate(img_sizes: list[int], settings: SearchSettings) -> None:
    cfg = AsViTConfig.from_arch(SEED)
    r, b, n = settings.repeats, settings.batch, settings.n_theta
    print(f"one candidate: {cfg.arch()}, {r} initialisations per measure, kappa on {b} images, "
          f"L^E on {n} points; {torch.get_num_threads()} threads\n")
    print(f"| img | L^E s ({n} points) | kappa s ({b} images) |")
    print("|---:|---:|---:|")
    for img in img_sizes:
        images = torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(0))
        build = lambda: create_asvit(cfg)  # noqa: E731
        curve_length(build, img, n_theta=n, repeats=1)  # warm-up (first calls trace and allocate)
        ntk_condition_number(build, images, repeats=1)
        start = time.perf_counter()
        curve_length(build, img, n_theta=n, repeats=r)
        t_len = time.perf_counter() - start
        start = time.perf_counter()
        ntk_condition_number(build, images, repeats=r)
        t_ntk = time.perf_counter() - start
        print(f"| {img} | {t_len:.2f} | {t_ntk:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=0, help="also run a search of this many steps")
    parser.add_argument("--search-img-size", type=int, default=32)
    parser.add_argument("--targets", default="30M,50M,90M")
    defaults = SearchSettings()
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--n-theta", type=int, default=defaults.n_theta)
    parser.add_argument("--out", default="runs/search-cost")
    args = parser.parse_args()
    measures = dict(repeats=args.repeats, batch=args.batch, n_theta=args.n_theta)
    per_candidate(args.img_sizes, SearchSettings(**measures))
    if not args.steps:
        return
    out = Path(args.out)
    start = time.perf_counter()
    result = run_search(SearchSettings(steps=args.steps, img_size=args.search_img_size, **measures),
                        out / "search", log=lambda _: None)
    t_search = time.perf_counter() - start
    last = result.trajectory[-1]
    print(f"\nsearch: {args.steps} steps at {args.search_img_size} px in {t_search:.0f} s; entropy "
          f"{result.trajectory[0]['entropy']:.2f} -> {last['entropy']:.2f}; topology "
          f"{result.topology.arch()}")
    start = time.perf_counter()
    scaled = autoscale(result.topology, ScaleSettings(targets=parse_sizes(args.targets),
                                                      img_size=args.search_img_size, **measures),
                       out / "scale", log=lambda _: None)
    t_scale = time.perf_counter() - start
    print(f"autoscale: {len(scaled.trajectory) - 1} steps to {args.targets} in {t_scale:.0f} s")
    for label, row in scaled.picks.items():
        print(f"  {label}: {row['arch']}  {row['params'] / 1e6:.1f}M params, "
              f"{row['gflops']:.2f} GFLOPs at 224 px")
    print(f"search + scaling: {(t_search + t_scale) / 60:.1f} min")


if __name__ == "__main__":
    main()
