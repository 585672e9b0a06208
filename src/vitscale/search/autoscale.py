"""`vitscale autoscale`: As-ViT's training-free growth of a topology into a family of sizes.

From one block per stage at width C = 32, every step proposes each combination of "one more
block in stage i" (4) and "widen C by r" for r in 5, 10, 15, 20% (rounded up to a width the heads
divide), drops candidates above the size cap, measures kappa and L^E of each at init on a proxy
(by default a quarter of the width, as the public code), ranks the candidates by kappa
(ascending) and by L^E (descending) and keeps the smallest sum of ranks; a tie goes to the
candidate the measure with the larger relative spread among candidates prefers. Every step is a
model of the family. The run stops when the largest target is reached or nothing fits under the
cap; each target gets the step whose size is nearest to it (in log scale).

Sizes are parameters (`--target-params 30M,50M`) or GFLOPs at `count_img_size`
(`--target-gflops 5,9`), counted analytically (`asvit_counts`) on the full-width model.
`random=True` replaces the ranking by a uniform choice among the candidates (the paper's
random-scaling baseline).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitscale.errors import ConfigError
from vitscale.models.asvit import AsViTConfig, asvit_counts
from vitscale.search.reinforce import SearchSettings, measure, ntk_batch, write_topology_yaml
from vitscale.utils.io import atomic_write_text

RATIOS = (0.05, 0.10, 0.15, 0.20)
CAP_FACTOR = 110 / 80  # the public code grows to >= 80M parameters with candidates capped at 110M


@dataclass
class ScaleSettings:
    targets: list[float] = field(default_factory=lambda: [30e6, 50e6, 90e6])
    by: str = "params"  # params | gflops
    start_width: int = 32
    proxy_ratio: float = 0.25  # proxy width / width for the measures (1: full width)
    img_size: int = 32  # resolution of the measures
    count_img_size: int = 224  # resolution GFLOPs are counted at
    batch: int = 8  # as SearchSettings: enough initialisations for a stable kappa ranking
    repeats: int = 16
    n_theta: int = 10
    num_classes: int = 1000
    seed: int = 0
    data: str = "digits"
    random: bool = False
    max_steps: int = 60

    def validate(self) -> None:
        if self.by not in ("params", "gflops"):
            raise ConfigError(f"autoscale by={self.by!r}: choose params or gflops")
        if not self.targets or min(self.targets) <= 0:
            raise ConfigError("autoscale needs positive targets, e.g. --target-params 30M,50M")
        if not 0 < self.proxy_ratio <= 1:
            raise ConfigError(f"autoscale proxy_ratio={self.proxy_ratio} must be in (0, 1]")
        if self.img_size % 32:
            raise ConfigError(f"autoscale img_size={self.img_size} must be a multiple of 32")


def parse_sizes(text: str) -> list[float]:
    """'30M,50M,1.2G' -> [30e6, 50e6, 1.2e9]; plain numbers as they are."""
    out = []
    for item in text.split(","):
        item = item.strip()
        scale = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}.get(item[-1:].upper(), 1.0)
        number = item[:-1] if scale != 1.0 else item
        try:
            out.append(float(number) * scale)
        except ValueError:
            raise ConfigError(f"bad size {item!r}; write numbers like 30M,50M or 5,9") from None
    return out


def width_step(width: int, ratio: float, multiple: int) -> int:
    """width * (1 + ratio), rounded up to a multiple of `multiple` (so the heads divide it)."""
    return int(math.ceil(width * (1 + ratio) / multiple) * multiple)


def size_of(cfg: AsViTConfig, settings: ScaleSettings) -> float:
    counts = asvit_counts(cfg, settings.count_img_size)
    return counts.params if settings.by == "params" else counts.flops / 1e9


def candidates(cfg: AsViTConfig, cap: float, settings: ScaleSettings) -> list[AsViTConfig]:
    multiple = max(cfg.heads // 8, 1)
    out, seen = [], set()
    for stage in range(4):
        depths = tuple(d + (i == stage) for i, d in enumerate(cfg.depths))
        for ratio in RATIOS:
            width = width_step(cfg.width, ratio, multiple)
            if (depths, width) in seen:
                continue
            seen.add((depths, width))
            cand = cfg.replace(depths=depths, width=width)
            if size_of(cand, settings) <= cap:
                out.append(cand)
    return out


def dense_rank(values: Sequence[float], descending: bool = False) -> list[int]:
    order = sorted(set(values), reverse=descending)
    return [order.index(v) for v in values]


def choose(kappas: Sequence[float], lengths: Sequence[float]) -> int:
    """The index with the smallest rank sum; ties decided by the measure with the larger
    relative spread ((max - min) / max) among all candidates."""
    rank_k, rank_l = dense_rank(kappas), dense_rank(lengths, descending=True)
    sums = [a + b for a, b in zip(rank_k, rank_l)]
    best = [i for i, s in enumerate(sums) if s == min(sums)]
    if len(best) == 1:
        return best[0]
    finite_k = [k for k in kappas if math.isfinite(k)] or [1.0]
    spread_k = (max(finite_k) - min(finite_k)) / max(finite_k)
    spread_l = (max(lengths) - min(lengths)) / max(max(lengths), 1e-12)
    if spread_k >= spread_l:
        return min(best, key=lambda i: kappas[i])
    return max(best, key=lambda i: lengths[i])


@dataclass
class ScaleResult:
    out_dir: Path
    trajectory: list[dict[str, Any]]
    picks: dict[str, dict[str, Any]]  # target label -> trajectory row


def _label(target: float, by: str) -> str:
    return f"{target / 1e6:g}M" if by == "params" else f"{target:g}GFLOPs"


def autoscale(topology: AsViTConfig, settings: ScaleSettings, out_dir: str | Path,
              log: Callable[[str], None] = print) -> ScaleResult:
    """Grow `topology` (its kernels, splits, expansions, heads) into the sizes of `settings`."""
    settings.validate()
    out = Path(out_dir)
    cfg = topology.replace(depths=(1, 1, 1, 1), width=settings.start_width,
                           num_classes=settings.num_classes, img_size=settings.count_img_size)
    goal, cap = max(settings.targets), max(settings.targets) * CAP_FACTOR
    gen = torch.Generator().manual_seed(settings.seed)
    proxy = SearchSettings(img_size=settings.img_size, width=8, batch=settings.batch,
                           repeats=settings.repeats, n_theta=settings.n_theta, seed=settings.seed,
                           data=settings.data)
    images = None if settings.random else ntk_batch(proxy)
    trajectory = [_row(0, cfg, settings, None, None)]
    step = 0
    while size_of(cfg, settings) < goal and step < settings.max_steps:
        step += 1
        cands = candidates(cfg, cap, settings)
        if not cands:
            log(f"step {step}: every candidate exceeds the cap {_label(cap, settings.by)}; stop")
            break
        if settings.random:
            pick, kappa, length = int(torch.randint(len(cands), (), generator=gen)), None, None
        else:
            kappas, lengths = [], []
            for j, cand in enumerate(cands):
                multiple = max(cand.heads // 8, 1)
                width = max(multiple, int(round(cand.width * settings.proxy_ratio / multiple)) * multiple)
                k, length_ = measure(cand.replace(width=width), images, proxy,
                                     settings.seed * 100_003 + step * 100 + j)
                kappas.append(k)
                lengths.append(length_)
            pick = choose(kappas, lengths)
            kappa, length = kappas[pick], lengths[pick]
        cfg = cands[pick]
        trajectory.append(_row(step, cfg, settings, kappa, length, len(cands)))
        r = trajectory[-1]
        log(f"step {step}: depths {cfg.depths} width {cfg.width}  {r['params'] / 1e6:.1f}M params "
            f"{r['gflops']:.2f} GFLOPs  ({len(cands)} candidates)")
    picks = {}
    for target in settings.targets:
        key = "params" if settings.by == "params" else "gflops"
        row = min(trajectory, key=lambda r: abs(math.log(r[key] / target)))
        picks[_label(target, settings.by)] = row
        write_topology_yaml(AsViTConfig.from_arch(row["arch"]),
                            out / f"asvit-{_label(target, settings.by)}.yaml",
                            f"vitscale autoscale, step {row['step']}, {row['params'] / 1e6:.1f}M "
                            f"params, {row['gflops']:.2f} GFLOPs at {settings.count_img_size} px")
    doc = {"settings": asdict(settings), "topology": topology.arch(), "trajectory": trajectory,
           "picks": picks}
    atomic_write_text(out / "autoscale.json", json.dumps(doc, indent=1))
    plot_trajectory(trajectory, out / "autoscale.png", picks)
    return ScaleResult(out, trajectory, picks)


def _row(step: int, cfg: AsViTConfig, settings: ScaleSettings, kappa: float | None,
         length: float | None, n_candidates: int = 0) -> dict[str, Any]:
    counts = asvit_counts(cfg, settings.count_img_size)
    return {"step": step, "arch": cfg.arch(), "depths": list(cfg.depths), "width": cfg.width,
            "params": counts.params, "gflops": counts.flops / 1e9, "kappa": kappa, "length": length,
            "candidates": n_candidates}


def plot_trajectory(trajectory: list[dict[str, Any]], path: Path,
                    picks: dict[str, dict[str, Any]]) -> Path:
    from vitscale.utils.plot import figure, save_png

    fig = figure(figsize=(5.5, 4))
    ax = fig.subplots()
    depth = [sum(r["depths"]) for r in trajectory]
    width = [r["width"] for r in trajectory]
    ax.plot(depth, width, "o-", ms=4)
    for label, r in picks.items():
        ax.annotate(label, (sum(r["depths"]), r["width"]), textcoords="offset points", xytext=(5, -12))
    ax.set_xlabel("total depth (blocks)")
    ax.set_ylabel("width C of stage 1")
    ax.set_title("auto-scaling trajectory")
    return save_png(fig, path)
