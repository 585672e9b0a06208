"""`vitscale search`: As-ViT's training-free topology search by policy gradient (REINFORCE).

One categorical distribution per decision of `SEARCH_SPACE` (12 of them; logits start at
1e-3 * N(0, 1), so the entropy starts at ln 4,556,250 = 15.33 nats). Each step samples one
topology, builds it with one block per stage at width C, and measures the NTK condition number
kappa on a fixed un-augmented batch and the curve length L^E at init (`complexity`). The reward
is the change of both measures since the previous step, each normalised by its range over the
last 20 steps: r_t = -(kappa_t - kappa_{t-1}) / range(kappa) + (L_t - L_{t-1}) / range(L)
(r_0 = 0); a topology whose kappa is not finite gets r = -2 and stays out of the ranges. The
baseline is a bias-corrected moving average of rewards (momentum 0.9, updated before use); the
policy takes one Adam step (lr 0.08) on -log pi(a_t) (r_t - b_t). The result is each
distribution's arg-max.

The run directory holds `search.json` (settings, the trajectory: every step's topology,
measures, reward, entropy and current arg-max; and the policy and optimizer state, so a run
resumes exactly), `search.png`, and `topology.yaml`, a config `vitscale train --config` accepts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vitscale.errors import ConfigError
from vitscale.models.asvit import SEARCH_SPACE, AsViTConfig, create_asvit
from vitscale.search.complexity import curve_length, ntk_condition_number
from vitscale.utils.io import atomic_write_text, read_json

DECISIONS = tuple(SEARCH_SPACE)
BAD_REWARD = -2.0


@dataclass
class SearchSettings:
    steps: int = 500
    img_size: int = 64  # the paper searched at 224; a candidate's cost per size: docs/benchmarks.md
    width: int = 32  # C of the candidates, one block per stage
    # With the paper's 3 inits on 16 images two runs rank topologies by kappa alike only at
    # Kendall tau 0.6-0.7; 16 inits on 8 images reach 0.82-0.88 (docs/benchmarks.md, test-retest).
    batch: int = 8  # images for the NTK
    repeats: int = 16  # initialisations averaged per measure
    n_theta: int = 10  # points on the input circle for L^E
    lr: float = 0.08
    baseline_momentum: float = 0.9
    window: int = 20
    seed: int = 0
    data: str = "digits"  # where the NTK batch comes from

    def validate(self) -> None:
        for key in ("steps", "img_size", "width", "batch", "repeats", "n_theta", "window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search {key}={getattr(self, key)} must be >= 1")
        if self.img_size % 32:
            raise ConfigError(f"search img_size={self.img_size} must be a multiple of 32 (four "
                              "stages of stride 4, 2, 2, 2)")
        if self.width % 8:
            raise ConfigError(f"search width={self.width} must be a multiple of 8 (so that every "
                              "head count of the space, up to 64, divides every stage width)")


def topology(choices: dict[str, int], width: int, num_classes: int = 10) -> AsViTConfig:
    """The candidate of a choice per decision (values, not indices), one block per stage."""
    return AsViTConfig(
        kernels=(choices["K1"], choices["K2"], choices["K3"], choices["K4"]),
        splits=(choices["S1"], choices["S2"], choices["S3"], 1),
        expansions=(choices["E1"], choices["E2"], choices["E3"], choices["E4"]),
        heads=choices["heads"], width=width, num_classes=num_classes)


class Policy(nn.Module):
    """Independent categoricals, one per decision."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.logits = nn.ParameterDict({
            d: nn.Parameter(1e-3 * torch.randn(len(SEARCH_SPACE[d]), generator=gen))
            for d in DECISIONS})

    def dists(self) -> dict[str, torch.distributions.Categorical]:
        return {d: torch.distributions.Categorical(logits=self.logits[d]) for d in DECISIONS}

    def sample(self, gen: torch.Generator) -> dict[str, int]:
        """Indices; drawn with `gen` so that the search is reproducible and resumable."""
        out = {}
        for d in DECISIONS:
            probs = self.logits[d].detach().softmax(-1)
            out[d] = int(torch.multinomial(probs, 1, generator=gen))
        return out

    def log_prob(self, index: dict[str, int]) -> torch.Tensor:
        return sum(dist.log_prob(torch.tensor(index[d])) for d, dist in self.dists().items())

    @torch.no_grad()
    def entropy(self) -> float:
        return float(sum(dist.entropy() for dist in self.dists().values()))

    def argmax(self) -> dict[str, int]:
        return {d: int(self.logits[d].argmax()) for d in DECISIONS}


def values(index: dict[str, int]) -> dict[str, int]:
    return {d: SEARCH_SPACE[d][i] for d, i in index.items()}


def normalised_change(history: list[float], window: int) -> float:
    """(m_t - m_{t-1}) / (max - min of the last `window` values + 1e-6)."""
    if len(history) < 2:
        return 0.0
    recent = history[-window:]
    return (history[-1] - history[-2]) / (max(recent) - min(recent) + 1e-6)


def ntk_batch(settings: SearchSettings) -> torch.Tensor:
    """A fixed, un-augmented batch of `settings.batch` training images."""
    from vitscale.config import DataConfig
    from vitscale.data import build_data

    data = build_data(DataConfig(source=settings.data, img_size=settings.img_size, augment="none",
                                 minival_fraction=0.0, eval_batch_size=settings.batch), settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pick = torch.randperm(len(data.train), generator=gen)[:settings.batch].tolist()
    transform = data.eval_transform
    return torch.stack([transform(data.train[i][0]) for i in pick])


def measure(cfg: AsViTConfig, images: torch.Tensor, settings: SearchSettings, seed: int
            ) -> tuple[float, float]:
    """(kappa, L^E) of the topology at init."""
    def build() -> nn.Module:
        return create_asvit(cfg)

    kappa = ntk_condition_number(build, images, repeats=settings.repeats, seed=seed)
    length = curve_length(build, settings.img_size, n_theta=settings.n_theta,
                          repeats=settings.repeats, seed=seed)
    return kappa, length


# ---------------------------------------------------------------------------------- state
def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        return {(int(k) if k.isdigit() else k): _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


@dataclass
class SearchResult:
    out_dir: Path
    topology: AsViTConfig
    trajectory: list[dict[str, Any]]


def run_search(settings: SearchSettings, out_dir: str | Path,
               log: Callable[[str], None] = print) -> SearchResult:
    """Search (or resume the search in `out_dir`) for `settings.steps` steps."""
    settings.validate()
    out = Path(out_dir)
    state_path = out / "search.json"
    gen = torch.Generator().manual_seed(settings.seed)
    policy = Policy(gen)
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.lr)
    trajectory: list[dict[str, Any]] = []
    baseline_num = baseline_den = 0.0
    if state_path.is_file():
        doc = read_json(state_path, ConfigError, "delete it to search afresh, or use another output folder")
        saved = {k: v for k, v in doc["settings"].items() if k != "steps"}
        now = {k: v for k, v in asdict(settings).items() if k != "steps"}
        if saved != now:
            changed = sorted(k for k in now if saved.get(k) != now[k])
            raise ConfigError(f"{state_path} was searched with other settings ({', '.join(changed)}); "
                              "use another output folder or the same settings")
        policy.load_state_dict(_from_json(doc["policy"]))
        optimizer.load_state_dict(_from_json(doc["optimizer"]))
        gen.set_state(_from_json(doc["generator"]))
        trajectory = doc["trajectory"]
        baseline_num, baseline_den = doc["baseline"]
        log(f"resuming the search in {out} at step {len(trajectory)}")
    images = ntk_batch(settings)
    kappas = [t["kappa"] for t in trajectory if math.isfinite(t["kappa"])]
    lengths = [t["length"] for t in trajectory if math.isfinite(t["kappa"])]
    m = settings.baseline_momentum
    for step in range(len(trajectory), settings.steps):
        start = time.perf_counter()
        index = policy.sample(gen)
        choice = values(index)
        kappa, length = measure(topology(choice, settings.width), images, settings,
                                settings.seed * 100_003 + step)
        if math.isfinite(kappa):
            kappas.append(kappa)
            lengths.append(length)
            reward = (-normalised_change(kappas, settings.window)
                      + normalised_change(lengths, settings.window)) if len(kappas) > 1 else 0.0
        else:
            reward = BAD_REWARD
        baseline_num = m * baseline_num + (1 - m) * reward
        baseline_den = m * baseline_den + (1 - m)
        baseline = baseline_num / baseline_den
        loss = -policy.log_prob(index) * (reward - baseline)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        best = values(policy.argmax())
        trajectory.append({
            "step": step, "arch": topology(choice, settings.width).arch(), "kappa": kappa,
            "length": length, "reward": reward, "baseline": baseline,
            "entropy": policy.entropy(), "argmax": topology(best, settings.width).arch(),
            "seconds": time.perf_counter() - start})
        t = trajectory[-1]
        log(f"step {step + 1}/{settings.steps}  kappa {kappa:.3g}  L^E {length:.4g}  reward "
            f"{reward:+.3f}  entropy {t['entropy']:.2f}  best {t['argmax']}  ({t['seconds']:.1f} s)")
        doc = {"settings": asdict(settings), "trajectory": trajectory,
               "policy": _to_json(policy.state_dict()), "optimizer": _to_json(optimizer.state_dict()),
               "generator": _to_json(gen.get_state()), "baseline": [baseline_num, baseline_den]}
        atomic_write_text(state_path, json.dumps(doc))
    final = topology(values(policy.argmax()), settings.width)
    write_topology_yaml(final, out / "topology.yaml", f"vitscale search, {len(trajectory)} steps "
                        f"at {settings.img_size} px")
    plot_search(trajectory, out / "search.png")
    return SearchResult(out, final, trajectory)


def write_topology_yaml(cfg: AsViTConfig, path: Path, note: str) -> Path:
    """A config for `vitscale train --config PATH` with this topology as the model."""
    import yaml

    text = (f"# As-ViT topology from {note}.\n"
            f"#   vitscale train --config {path} data.source=... data.img_size=...\n"
            + yaml.safe_dump({"model": {"name": f"asvit:{cfg.arch()}"}}, sort_keys=False))
    return atomic_write_text(path, text)


def plot_search(trajectory: list[dict[str, Any]], path: Path) -> Path:
    from vitscale.utils.plot import figure, save_png

    steps = [t["step"] for t in trajectory]
    fig = figure(figsize=(6, 7))
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(steps, [t["entropy"] for t in trajectory])
    axes[0].set_ylabel("policy entropy (nats)")
    axes[1].plot(steps, [t["reward"] for t in trajectory], ".", ms=3, label="reward")
    axes[1].plot(steps, [t["baseline"] for t in trajectory], label="baseline")
    axes[1].legend()
    finite = [t for t in trajectory if math.isfinite(t["kappa"])]
    axes[2].semilogy([t["step"] for t in finite], [t["kappa"] for t in finite], ".", ms=3,
                     label="NTK kappa")
    twin = axes[2].twinx()
    twin.plot([t["step"] for t in finite], [t["length"] for t in finite], ".", ms=3, color="tab:red")
    twin.set_ylabel("L^E", color="tab:red")
    axes[2].set_ylabel("kappa")
    axes[2].set_xlabel("search step")
    return save_png(fig, path)


def random_topologies(n: int, settings: SearchSettings, out_dir: str | Path,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The paper's random baseline: `n` uniformly drawn topologies with their measures; the
    first is written as `random_topology.yaml`."""
    settings.validate()
    gen = torch.Generator().manual_seed(settings.seed + 7)
    images = ntk_batch(settings)
    rows = []
    while len(rows) < n:
        choice = {d: SEARCH_SPACE[d][int(torch.randint(len(SEARCH_SPACE[d]), (), generator=gen))]
                  for d in DECISIONS}
        cfg = topology(choice, settings.width)
        kappa, length = measure(cfg, images, settings, settings.seed * 100_003 + 50_000 + len(rows))
        rows.append({"arch": cfg.arch(), "kappa": kappa, "length": length})
        log(f"random {len(rows)}/{n}: {cfg.arch()}  kappa {kappa:.3g}  L^E {length:.4g}")
    out = Path(out_dir)
    atomic_write_text(out / "random.json", json.dumps(rows, indent=1))
    write_topology_yaml(AsViTConfig.from_arch(rows[0]["arch"]), out / "random_topology.yaml",
                        "a uniformly random draw (baseline)")
    return rows
