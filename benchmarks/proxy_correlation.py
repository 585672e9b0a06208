"""Do As-ViT's training-free proxies predict accuracy, and do they agree with themselves?

    python benchmarks/proxy_correlation.py                  # 24 topologies, 4 epochs, 2 seeds
    python benchmarks/proxy_correlation.py --n 40 --epochs 8 --out runs/proxy
    python benchmarks/proxy_correlation.py --retest --n 16 --max-repeats 8 --batches 4 8 16 32
    python benchmarks/proxy_correlation.py --retest --costs-only --batches 4 8 16 32

Default mode: samples N topologies uniformly from the As-ViT search space (one block per stage,
width C), measures the NTK condition number kappa and the curve length L^E at initialization
with the search's settings (--repeats, --batch, --n-theta; defaults those of `vitscale
search`), trains each briefly from scratch on digits with --train-seeds seeds, and reports
Kendall's tau between the mean accuracy and -kappa, L^E and the search's combined score (the sum
of the two ranks, lower is better), the accuracy's own seed-to-seed tau (how well accuracy can
be predicted at all), and a scatter plot.

--retest: the proxies' test-retest agreement. For each of N topologies, 2 * --max-repeats
initialisations (kappa on the first max(--batches) images of the search's fixed batch, L^E on
max(--n-thetas) circle points); kappa for a smaller batch B is the condition number of the
leading B x B block of the same Gram matrix (exactly the NTK of the first B images), L^E for
fewer points sums every k-th point of the same circle. For R initialisations, tau is Kendall's
tau between the N estimates (mean over R, as the paper) from two disjoint sets of R
initialisations, averaged over random splits. "new batch" pairs kappa on images 1..B with kappa
on images B+1..2B (other inits too): the agreement of the ranking across batches as well. Cost
per candidate = R x (seconds of one initialisation of each measure), timed on the first
--cost-n topologies at each B and n_theta (--costs-only: only that).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata

from vitscale.models.asvit import SEARCH_SPACE, AsViTConfig, create_asvit
from vitscale.search.complexity import condition_number, curve_speeds, init_gram, init_seed
from vitscale.search.reinforce import DECISIONS, SearchSettings, measure, ntk_batch, topology


def draw(n: int, width: int, seed: int) -> list[AsViTConfig]:
    """N topologies drawn uniformly from the search space."""
    gen = torch.Generator().manual_seed(seed)
    return [topology({d: SEARCH_SPACE[d][int(torch.randint(len(SEARCH_SPACE[d]), (), generator=gen))]
                      for d in DECISIONS}, width) for _ in range(n)]


def train_accuracy(cfg: AsViTConfig, img_size: int, epochs: float, seed: int) -> float:
    from vitscale.train import run

    with tempfile.TemporaryDirectory() as tmp:
        result = run(None, [f"model.name=asvit:{cfg.arch()}", "data.source=digits",
                            f"data.img_size={img_size}", "data.batch_size=64",
                            "data.augment=none", "data.flip=false", "data.crop_scale_min=0.6",
                            "optim.lr=0.001", "optim.weight_decay=0.05",
                            "schedule.warmup_fraction=0.05", f"epochs={epochs}",
                            f"seed={seed}", "progress=false", f"out_dir={tmp}"])
    return result.metrics["test/accuracy"]


def correlation(args: argparse.Namespace, out: Path) -> None:
    settings = SearchSettings(img_size=args.img_size, width=args.width, repeats=args.repeats,
                              batch=args.batch, n_theta=args.n_theta, seed=args.seed)
    images = ntk_batch(settings)
    rows = []
    print(f"kappa: {args.repeats} inits on {args.batch} images; L^E: {args.repeats} inits, "
          f"{args.n_theta} points; training: {args.epochs} epochs x {args.train_seeds} seeds\n")
    print("| # | topology | kappa | L^E | measure s | test accuracy (per seed) | train s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for i, cfg in enumerate(draw(args.n, args.width, args.seed)):
        start = time.perf_counter()
        kappa, length = measure(cfg, images, settings, args.seed * 1000 + i)
        measure_s = time.perf_counter() - start
        start = time.perf_counter()
        accs = [train_accuracy(cfg, args.img_size, args.epochs, args.seed + k)
                for k in range(args.train_seeds)]
        rows.append(dict(arch=cfg.arch(), kappa=kappa, length=length, accuracies=accs,
                         accuracy=sum(accs) / len(accs), measure_s=measure_s,
                         train_s=time.perf_counter() - start))
        cell = cfg.arch().replace("|", "\\|")  # a markdown table cell
        print(f"| {i + 1} | {cell} | {kappa:.4g} | {length:.4g} | {measure_s:.1f} | "
              f"{' / '.join(f'{a:.4f}' for a in accs)} | {rows[-1]['train_s']:.0f} |", flush=True)
    acc = [r["accuracy"] for r in rows]
    combined = rankdata([r["kappa"] for r in rows]) + rankdata([-r["length"] for r in rows])
    taus = {"-kappa": kendalltau([-r["kappa"] for r in rows], acc),
            "L^E": kendalltau([r["length"] for r in rows], acc),
            "combined (-rank sum)": kendalltau(-combined, acc)}
    print()
    for name, t in taus.items():
        print(f"Kendall tau(mean accuracy, {name}) = {t.statistic:+.3f} (p = {t.pvalue:.3f})")
    if args.train_seeds > 1:  # how far accuracy agrees with itself: a ceiling for any proxy
        first, second = ([r["accuracies"][k] for r in rows] for k in (0, 1))
        t = taus["accuracy, first vs second seed"] = kendalltau(first, second)
        print(f"Kendall tau(accuracy of seed {args.seed}, of seed {args.seed + 1}) = "
              f"{t.statistic:+.3f} (p = {t.pvalue:.3f})")
    (out / "proxy_correlation.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows,
         "tau": {k: [t.statistic, t.pvalue] for k, t in taus.items()}}, indent=1))
    plot(rows, taus, out / "proxy_correlation.png")
    print(f"\nwrote {out / 'proxy_correlation.json'} and {out / 'proxy_correlation.png'}")


def split_tau(first: np.ndarray, second: np.ndarray, r: int, splits: int,
              rng: np.random.Generator) -> float:
    """Mean Kendall tau between the topologies' means over r random initialisations (columns)
    of `first` and over r other initialisations of `second` (topologies x inits arrays)."""
    inits = first.shape[1]
    taus = []
    for _ in range(splits if 2 * r < inits else 1):
        cols = rng.permutation(inits)
        taus.append(kendalltau(first[:, cols[:r]].mean(1), second[:, cols[r:2 * r]].mean(1)).statistic)
    return float(np.mean(taus))


def retest(args: argparse.Namespace, out: Path) -> None:
    bmax, nmax = max(args.batches), max(args.n_thetas)
    if any(nmax % n for n in args.n_thetas):
        raise SystemExit("every --n-thetas value must divide the largest")
    images = ntk_batch(SearchSettings(img_size=args.img_size, batch=bmax, seed=args.seed))
    cfgs = draw(args.n, args.width, args.seed)
    if args.costs_only:
        cost_k, cost_l = unit_costs(cfgs[:args.cost_n], images, args)
        print(f"seconds per initialisation, {args.cost_n} topologies, "
              f"{torch.get_num_threads()} threads:\n")
        print("| measure | s / init |\n|---|---:|")
        print("\n".join([f"| kappa, B = {b} | {t:.3f} |" for b, t in cost_k.items()]
                        + [f"| L^E, n_theta = {n} | {t:.3f} |" for n, t in cost_l.items()]))
        return
    inits = 2 * args.max_repeats
    kappa = np.zeros((len(args.batches), args.n, inits))
    second = np.zeros((len(args.batches), args.n, inits))  # on the next B images ("new batch")
    length = np.zeros((len(args.n_thetas), args.n, inits))
    start = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        def build(cfg=cfg):
            return create_asvit(cfg)

        for k in range(inits):
            seed = init_seed(args.seed * 1000 + i, k)
            gram = init_gram(build, images, seed)
            for j, b in enumerate(args.batches):
                kappa[j, i, k] = condition_number(gram[:b, :b])
                second[j, i, k] = condition_number(gram[b:2 * b, b:2 * b]) if 2 * b <= bmax else np.nan
            speeds = curve_speeds(build, args.img_size, n_theta=nmax, seed=seed)
            for j, n in enumerate(args.n_thetas):
                length[j, i, k] = float(speeds[::nmax // n].sum())
        print(f"{i + 1}/{args.n} {cfg.arch()}  ({time.perf_counter() - start:.0f} s)", flush=True)
    cost_k, cost_l = unit_costs(cfgs[:args.cost_n], images, args)
    rng = np.random.default_rng(0)
    repeats = [r for r in args.repeats_list if r <= args.max_repeats]
    print(f"\n{args.n} topologies at {args.img_size} px, C = {args.width}; {inits} initialisations "
          f"each; tau averaged over {args.splits} random splits into two disjoint sets of R. "
          f"Seconds per initialisation timed on {args.cost_n} topologies, "
          f"{torch.get_num_threads()} threads.\n")
    print("kappa:\n\n| R | B | tau (same batch) | tau (new batch) | s / candidate |")
    print("|---:|---:|---:|---:|---:|")
    table = {"kappa": [], "length": []}
    for r in repeats:
        for j, b in enumerate(args.batches):
            tau = split_tau(kappa[j], kappa[j], r, args.splits, rng)
            new = split_tau(kappa[j], second[j], r, args.splits, rng) if 2 * b <= bmax else np.nan
            table["kappa"].append(dict(repeats=r, batch=b, tau=tau, tau_new_batch=new,
                                       seconds=r * cost_k[b]))
            print(f"| {r} | {b} | {tau:.3f} | {'-' if np.isnan(new) else f'{new:.3f}'} | "
                  f"{r * cost_k[b]:.2f} |")
    print("\nL^E:\n\n| R | n_theta | tau | s / candidate |")
    print("|---:|---:|---:|---:|")
    for r in repeats:
        for j, n in enumerate(args.n_thetas):
            tau = split_tau(length[j], length[j], r, args.splits, rng)
            table["length"].append(dict(repeats=r, n_theta=n, tau=tau, seconds=r * cost_l[n]))
            print(f"| {r} | {n} | {tau:.3f} | {r * cost_l[n]:.2f} |")
    spread = {b: float(np.log(kappa[j]).mean(1).std()) for j, b in enumerate(args.batches)}
    noise = {b: float(np.log(kappa[j]).std(1, ddof=1).mean()) for j, b in enumerate(args.batches)}
    print("\nlog kappa: spread of the topologies' means / spread over one topology's inits: "
          + ", ".join(f"B={b}: {spread[b]:.3f} / {noise[b]:.3f}" for b in args.batches))
    (out / "proxy_retest.json").write_text(json.dumps(
        {"args": vars(args), "archs": [c.arch() for c in cfgs], "kappa": kappa.tolist(),
         "kappa_next_batch": np.nan_to_num(second, nan=-1).tolist(), "length": length.tolist(),
         "seconds_per_init": {"kappa": cost_k, "length": cost_l}, "table": table}, indent=1))
    print(f"\nwrote {out / 'proxy_retest.json'}")


def unit_costs(cfgs: list[AsViTConfig], images: torch.Tensor, args: argparse.Namespace):
    """Seconds of one initialisation of kappa per batch size and of L^E per n_theta: the fastest
    of 5 timings on each topology (other jobs share the cores), averaged over the topologies."""
    def timed(fn, *fn_args, **fn_kwargs) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(*fn_args, **fn_kwargs)
            times.append(time.perf_counter() - start)
        return min(times)

    cost_k = {b: 0.0 for b in args.batches}
    cost_l = {n: 0.0 for n in args.n_thetas}
    for cfg in cfgs:
        def build(cfg=cfg):
            return create_asvit(cfg)

        init_gram(build, images[:2], 0)  # warm-up: the first call traces torch.func
        curve_speeds(build, args.img_size, n_theta=2)
        for b in args.batches:
            cost_k[b] += timed(init_gram, build, images[:b], 1) / len(cfgs)
        for n in args.n_thetas:
            cost_l[n] += timed(curve_speeds, build, args.img_size, n_theta=n, seed=1) / len(cfgs)
    return cost_k, cost_l


def plot(rows, taus, path: Path) -> None:
    from vitscale.utils.plot import figure, save_png

    acc = [r["accuracy"] for r in rows]
    fig = figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    axes[0].scatter([r["kappa"] for r in rows], acc)
    axes[0].set_xscale("log")
    axes[0].set_xlabel(f"NTK kappa at init (tau {taus['-kappa'].statistic:+.2f} with -kappa)")
    axes[0].set_ylabel("test accuracy after short training")
    axes[1].scatter([r["length"] for r in rows], acc, color="tab:red")
    axes[1].set_xlabel(f"L^E at init (tau {taus['L^E'].statistic:+.2f})")
    save_png(fig, path)


def main() -> None:
    defaults = SearchSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="topologies")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/proxy-correlation")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--n-theta", type=int, default=defaults.n_theta)
    parser.add_argument("--retest", action="store_true", help="test-retest agreement instead")
    parser.add_argument("--max-repeats", type=int, default=8, help="retest: R up to this")
    parser.add_argument("--repeats-list", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--n-thetas", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--cost-n", type=int, default=4, help="retest: topologies timed")
    parser.add_argument("--costs-only", action="store_true", help="retest: only the timings")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (retest if args.retest else correlation)(args, out)


if __name__ == "__main__":
    main()
