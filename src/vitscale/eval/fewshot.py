"""Few-shot linear evaluation: closed-form regularised least squares on frozen features.

The evaluator of ViT and Scaling ViT, as big_vision's `fewshot_lsr` defines it
(shared/research/big_vision.md, section 2a), for one draw of the shots:

1. k examples per class from the train features, drawn with numpy `default_rng(seed)`: a
   random permutation of each class's indices, its first k.
2. Standardise every feature with the mean and std (ddof 0, plus 1e-5) of those N = kC
   examples, then append a constant column of 100 (an almost unregularised bias).
3. Targets 2 * onehot - 1 in {-1, 1}^C; ridge weights W = (X^T X + l2 I)^-1 X^T Y, from an
   eigendecomposition of the smaller of X^T X and X X^T (the same W either way).
4. Accuracy of argmax(X_test W) on the whole test split, standardised the same way.

Several seeds give the mean and spread. The eigendecomposition is kept per draw, so trying
several regularisation strengths costs one solve each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vitscale.errors import DataError

BIAS_VALUE = 100.0
STD_EPS = 1e-5
DEFAULT_L2 = 2.0**10  # big_vision's l2_reg
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3


def draw_shots(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of `shots` examples of each class (big_vision's draw for `seed`)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[:shots])
    return np.concatenate(picked)


class RidgeSolver:
    """Ridge regression of ±1 targets on standardised features plus a bias column of 100."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + STD_EPS
        x = self.prepare(x)
        targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
        self.primal = x.shape[0] >= x.shape[1]  # N >= D + 1: decompose X^T X, else X X^T
        gram = x.T @ x if self.primal else x @ x.T
        self.eigvals, self.eigvecs = np.linalg.eigh(gram)
        self.x, self.targets = x, targets

    def prepare(self, x: np.ndarray) -> np.ndarray:
        x = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return np.concatenate([x, np.full((x.shape[0], 1), BIAS_VALUE)], axis=1)

    def weights(self, l2: float) -> np.ndarray:
        q, inv = self.eigvecs, 1.0 / (self.eigvals + l2)
        if self.primal:  # (X^T X + l2 I)^-1 X^T Y
            return q @ (inv[:, None] * (q.T @ (self.x.T @ self.targets)))
        return self.x.T @ (q @ (inv[:, None] * (q.T @ self.targets)))  # X^T (X X^T + l2 I)^-1 Y

    def accuracy(self, l2: float, test_x: np.ndarray, test_y: np.ndarray) -> float:
        scores = self.prepare(test_x) @ self.weights(l2)
        return float((scores.argmax(axis=1) == np.asarray(test_y)).mean())


@dataclass
class FewShotResult:
    shots: int
    l2: float
    accuracies: list[float]  # one per seed
    seeds: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def as_dict(self) -> dict:
        return {"shots": self.shots, "l2": self.l2, "mean": self.mean, "std": self.std,
                "accuracies": self.accuracies, "seeds": self.seeds}


def fewshot_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, shots: Sequence[int] = DEFAULT_SHOTS,
                 seeds: int | Sequence[int] = DEFAULT_SEEDS,
                 l2: float | Sequence[float] = DEFAULT_L2,
                 num_classes: int | None = None) -> list[FewShotResult]:
    """Few-shot accuracy for every (shots, l2), each over the given seeds (an int n: 0..n-1)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    num_classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    l2s = [float(l2)] if np.isscalar(l2) else [float(v) for v in l2]
    counts = np.bincount(train_y, minlength=num_classes)
    smallest = int(counts.min())
    for k in shots:
        if k < 1:
            raise DataError(f"shots must be positive, got {k}")
        if k > smallest:
            raise DataError(
                f"{k} shots need {k} train examples of every class, but class "
                f"{int(counts.argmin())} has only {smallest}; use shots <= {smallest}")
    results = []
    for k in shots:
        per_l2: dict[float, list[float]] = {v: [] for v in l2s}
        for seed in seeds:
            idx = draw_shots(train_y, k, seed, num_classes)
            solver = RidgeSolver(train_x[idx], train_y[idx], num_classes)
            for v in l2s:
                per_l2[v].append(solver.accuracy(v, test_x, test_y))
        results += [FewShotResult(k, v, accs, seeds) for v, accs in per_l2.items()]
    return results
