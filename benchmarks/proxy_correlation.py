"""Do As-ViT's training-free proxies predict accuracy? Kendall tau on digits.

    python benchmarks/proxy_correlation.py                 # 24 topologies, 4 epochs each
    python benchmarks/proxy_correlation.py --n 40 --epochs 8 --out runs/proxy

Samples N topologies uniformly from the As-ViT search space (one block per stage, width C),
measures the NTK condition number kappa and the curve length L^E at initialization, trains
each briefly from scratch on digits, and reports Kendall's tau between accuracy and -kappa,
L^E, and the search's combined score (the sum of the two ranks, lower is better), with a
scatter plot. Whatever it says is the result: the paper reports a strong correlation on
ImageNet; a weak one on a tiny task is worth knowing too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau, rankdata

from vitscale.models.asvit import SEARCH_SPACE
from vitscale.search.reinforce import DECISIONS, SearchSettings, measure, ntk_batch, topology
from vitscale.train import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/proxy-correlation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = SearchSettings(img_size=args.img_size, width=args.width, repeats=args.repeats,
                              seed=args.seed)
    images = ntk_batch(settings)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    print("| # | topology | kappa | L^E | measure s | test accuracy | train s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for i in range(args.n):
        choice = {d: SEARCH_SPACE[d][int(torch.randint(len(SEARCH_SPACE[d]), (), generator=gen))]
                  for d in DECISIONS}
        cfg = topology(choice, args.width)
        start = time.perf_counter()
        kappa, length = measure(cfg, images, settings, args.seed * 1000 + i)
        measure_s = time.perf_counter() - start
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = run(None, [f"model.name=asvit:{cfg.arch()}", "data.source=digits",
                                f"data.img_size={args.img_size}", "data.batch_size=64",
                                "data.augment=none", "data.flip=false", "data.crop_scale_min=0.6",
                                "optim.lr=0.001", "optim.weight_decay=0.05",
                                "schedule.warmup_fraction=0.05", f"epochs={args.epochs}",
                                f"seed={args.seed}", "progress=false", f"out_dir={tmp}"])
        acc = result.metrics["test/accuracy"]
        rows.append(dict(arch=cfg.arch(), kappa=kappa, length=length, accuracy=acc,
                         measure_s=measure_s, train_s=time.perf_counter() - start))
        cell = cfg.arch().replace("|", "\\|")  # a markdown table cell
        print(f"| {i + 1} | {cell} | {kappa:.4g} | {length:.4g} | {measure_s:.1f} | "
              f"{acc:.4f} | {rows[-1]['train_s']:.0f} |", flush=True)
    acc = [r["accuracy"] for r in rows]
    combined = rankdata([r["kappa"] for r in rows]) + rankdata([-r["length"] for r in rows])
    taus = {"-kappa": kendalltau([-r["kappa"] for r in rows], acc),
            "L^E": kendalltau([r["length"] for r in rows], acc),
            "combined (-rank sum)": kendalltau(-combined, acc)}
    print()
    for name, t in taus.items():
        print(f"Kendall tau(accuracy, {name}) = {t.statistic:+.3f} (p = {t.pvalue:.3f})")
    (out / "proxy_correlation.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows,
         "tau": {k: [t.statistic, t.pvalue] for k, t in taus.items()}}, indent=1))
    plot(rows, taus, out / "proxy_correlation.png")
    print(f"\nwrote {out / 'proxy_correlation.json'} and {out / 'proxy_correlation.png'}")


def plot(rows, taus, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r["accuracy"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    axes[0].scatter([r["kappa"] for r in rows], acc)
    axes[0].set_xscale("log")
    axes[0].set_xlabel(f"NTK kappa at init (tau {taus['-kappa'].statistic:+.2f} with -kappa)")
    axes[0].set_ylabel("test accuracy after short training")
    axes[1].scatter([r["length"] for r in rows], acc, color="tab:red")
    axes[1].set_xlabel(f"L^E at init (tau {taus['L^E'].statistic:+.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
