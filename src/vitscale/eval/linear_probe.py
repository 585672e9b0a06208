"""Linear probe: multinomial logistic regression on frozen features (the ViT-22B protocol).

Features are standardised with the train mean and std. For each weight decay of a sweep the
objective mean_i CE(W x_i + b, y_i) + wd / 2 * ||W||^2 (bias not decayed) is minimised by
full-batch L-BFGS in float64; the weight decay with the best minival accuracy is kept and its
test accuracy reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_WDS = tuple(10.0**e for e in range(-6, 0))  # 1e-6 ... 1e-1


@dataclass
class Probe:
    weight: torch.Tensor  # (C, D), on standardised features
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor
    std: torch.Tensor
    wd: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(x).argmax(-1) == y).double().mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
              max_iter: int = 500, tol: float = 1e-9) -> Probe:
    """The minimiser of mean cross-entropy + wd/2 ||W||^2 by full-batch L-BFGS."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * wd * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(w.detach(), b.detach(), mean, std, wd)


@dataclass
class ProbeResult:
    wd: float
    minival_accuracy: float
    test_accuracy: float
    sweep: dict[float, float]  # wd -> minival accuracy

    def as_dict(self) -> dict:
        return {"wd": self.wd, "minival_accuracy": self.minival_accuracy,
                "test_accuracy": self.test_accuracy,
                "sweep": {f"{k:g}": v for k, v in self.sweep.items()}}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, wds: Sequence[float] = DEFAULT_WDS) -> ProbeResult:
    """Sweep `wds` on minival, report the test accuracy of the best (smallest wd on ties)."""
    probes = {wd: fit_probe(train_x, train_y, num_classes, wd) for wd in wds}
    sweep = {wd: p.accuracy(val_x, val_y) for wd, p in probes.items()}
    best = max(sorted(sweep), key=lambda wd: sweep[wd])
    return ProbeResult(best, sweep[best], probes[best].accuracy(test_x, test_y), sweep)
