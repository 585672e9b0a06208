"""Scaling ViT's saturating power law, E = a (C + d)^(-b) + c, fitted to the Pareto frontier of
error against compute (or parameters, or images seen).

- c is the irreducible error; d the compute offset that keeps near-zero compute at a finite error.
- Least squares on log error (the points span decades of error), bounded (a, b > 0, 0 <= c <
  the smallest error, d >= 0), from several starting points, with x normalised by its geometric
  mean for conditioning; the constants are reported for x in the caller's units (FLOPs).
- 90% intervals per constant from a residual bootstrap: the fitted curve times resampled
  log-residuals (inflated by sqrt(n / (n - 4)) for the four fitted constants), refitted.
- Compute units: the trainer records training FLOPs (3 x forward FLOPs x images). The paper's
  axis is TPUv3 core-days; one core-day at the core's peak (61.5 bf16 TFLOP/s, half a 123 TFLOP/s
  chip) is `CORE_DAY_FLOPS` = 5.3e18 FLOPs, so C / CORE_DAY_FLOPS is an upper bound of the work in
  core-days (real runs reach a fraction of peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitscale.scaling.errors import ScalingError

CORE_DAY_FLOPS = 61.5e12 * 86400  # one TPUv3 core (half a chip) for a day at peak bf16 throughput
CONSTANTS = ("a", "b", "c", "d")


def pareto_frontier(x: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the points no cheaper point beats: sorted by x, each with an error lower than
    every point of smaller x (ties in x: the lowest error)."""
    order = np.lexsort((error, x))
    keep, best = [], math.inf
    for i in order:
        if error[i] < best:
            keep.append(i)
            best = error[i]
    return np.array(keep, dtype=int)


def law(x: np.ndarray | float, a: float, b: float, c: float, d: float) -> np.ndarray:
    return a * (np.asarray(x, dtype=float) + d) ** (-b) + c


@dataclass
class PowerLawFit:
    """The fitted constants (x in the caller's units), their 90% intervals and the data."""

    a: float
    b: float
    c: float
    d: float
    intervals: dict[str, list[float]] = field(default_factory=dict)
    x: list[float] = field(default_factory=list)  # the frontier the law was fitted to
    error: list[float] = field(default_factory=list)
    rms_log_residual: float = 0.0
    at_bounds: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # metric, x axis, sources
    bootstrap: list[list[float]] = field(default_factory=list)  # (a, b, c, d) per resample

    def predict(self, x: float | np.ndarray) -> np.ndarray | float:
        out = law(x, self.a, self.b, self.c, self.d)
        return float(out) if np.ndim(out) == 0 else out

    def compute_for(self, error: float) -> float:
        """The x at which the law reaches `error` (it must lie above the irreducible c)."""
        if error <= self.c:
            raise ScalingError(f"error {error:g} is at or below the fitted irreducible error "
                               f"c = {self.c:.4g}: no compute reaches it; ask for a higher error")
        if error >= self.predict(0.0):
            return 0.0
        return ((error - self.c) / self.a) ** (-1.0 / self.b) - self.d

    def band(self, x: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise `level` interval of the fitted curve over the bootstrap resamples."""
        if not self.bootstrap:
            curve = self.predict(x)
            return curve, curve
        curves = np.array([law(x, *p) for p in self.bootstrap])
        lo = (1 - level) / 2
        return np.quantile(curves, lo, axis=0), np.quantile(curves, 1 - lo, axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {"law": "E = a * (C + d)^(-b) + c", "a": self.a, "b": self.b, "c": self.c,
                "d": self.d, "intervals": self.intervals, "rms_log_residual": self.rms_log_residual,
                "at_bounds": self.at_bounds, "frontier": {"x": self.x, "error": self.error},
                "core_day_flops": CORE_DAY_FLOPS, **self.meta, "bootstrap": self.bootstrap}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PowerLawFit:
        try:
            consts = {k: float(doc[k]) for k in CONSTANTS}
        except (KeyError, TypeError, ValueError):
            raise ScalingError("not a vitscale scaling fit (a fit.json needs the constants a, b, "
                               "c, d); write one with vitscale scaling fit") from None
        meta = {k: doc[k] for k in ("metric", "x_axis", "x_unit", "points", "sources")
                if k in doc}
        frontier = doc.get("frontier", {})
        return cls(**consts, intervals=doc.get("intervals", {}), x=frontier.get("x", []),
                   error=frontier.get("error", []),
                   rms_log_residual=float(doc.get("rms_log_residual", 0.0)),
                   at_bounds=doc.get("at_bounds", []), meta=meta,
                   bootstrap=doc.get("bootstrap", []))


# ---------------------------------------------------------------------------------- fitting
def _check(x: np.ndarray, error: np.ndarray) -> None:
    if x.shape != error.shape or x.ndim != 1:
        raise ScalingError("compute and error must be two lists of the same length")
    if not (np.isfinite(x).all() and np.isfinite(error).all()):
        raise ScalingError("compute and error must be finite numbers")
    if (x < 0).any() or (error <= 0).any():
        raise ScalingError("compute must be >= 0 and every error > 0; check the metric (an "
                           "error, 1 - accuracy, or a loss) and the x axis")


def _solve(xs: np.ndarray, error: np.ndarray, starts: list[np.ndarray]):
    """Best least-squares solution on log error over the starting points, x normalised."""
    from scipy.optimize import least_squares

    log_e = np.log(error)
    c_max = float(error.min()) * (1 - 1e-6)
    lower = np.array([1e-12, 1e-3, 0.0, 0.0])
    upper = np.array([np.inf, 10.0, c_max, 100.0 * float(xs.max())])

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(law(xs, *p)) - log_e

    best = None
    for start in starts:
        start = np.minimum(np.maximum(start, lower), upper)
        try:
            sol = least_squares(residuals, start, bounds=(lower, upper), method="trf",
                                x_scale="jac", max_nfev=4000)
        except ValueError:
            continue
        if best is None or sol.cost < best.cost:
            best = sol
    return best, lower, upper


def _starts(xs: np.ndarray, error: np.ndarray) -> list[np.ndarray]:
    e_min = float(error.min())
    starts = []
    for b in (0.2, 0.5, 1.0):
        for c_frac in (0.0, 0.5, 0.9):
            for d in (0.0, 0.01 * float(xs.min()), float(xs.min())):
                c = c_frac * e_min
                a = max(float(error[np.argmin(xs)]) - c, 1e-6) * (float(xs.min()) + d) ** b
                starts.append(np.array([a, b, c, d]))
    return starts


def fit_power_law(x, error, *, bootstrap: int = 300, seed: int = 0,
                  frontier: bool = True, meta: dict[str, Any] | None = None) -> PowerLawFit:
    """Fit E = a (x + d)^(-b) + c to the Pareto frontier of (x, error) (all points with
    `frontier=False`); see the module docstring. One-line ScalingError on degenerate data."""
    x, error = np.asarray(x, dtype=float), np.asarray(error, dtype=float)
    _check(x, error)
    if len(x) < 4:
        raise ScalingError(f"a saturating power law has 4 constants; got {len(x)} point(s), "
                           "need at least 4 (more runs, or more evaluations per run)")
    if np.ptp(error) == 0:
        raise ScalingError(f"all {len(x)} errors are equal ({error[0]:g}): there is no trend to "
                           "fit; check that the runs learned and the metric is the right one")
    idx = pareto_frontier(x, error) if frontier else np.argsort(x)
    fx, fe = x[idx], error[idx]
    if len(fx) < 4:
        raise ScalingError(f"the Pareto frontier of error against compute has {len(fx)} point(s) "
                           "(error does not fall as compute grows); need at least 4: add larger "
                           "or longer runs")
    if np.ptp(fx) == 0:
        raise ScalingError("every frontier point has the same compute; vary the budget")
    if not (fx > 0).any():
        raise ScalingError("every frontier point has zero compute; record the runs' train_flops")
    scale = float(np.exp(np.mean(np.log(fx[fx > 0]))))  # geometric mean: x of order 1
    xs = fx / scale
    sol, lower, upper = _solve(xs, fe, _starts(xs, fe))
    if sol is None:
        raise ScalingError("the power-law fit did not converge on these points; check them with "
                           "--json or fit a CSV of compute,error")

    def unscaled(p: np.ndarray) -> list[float]:  # constants for x in the caller's units
        a, b, c, d = (float(v) for v in p)
        return [a * scale**b, b, c, d * scale]

    params = sol.x
    fitted = law(xs, *params)
    resid = np.log(fe) - np.log(fitted)
    n = len(fe)
    rms = float(np.sqrt(np.mean(resid**2)))
    # A constant on its bound: the data do not pin it (e.g. b = 10, a cliff, not a power law).
    at_bounds = [name for name, v, lo, hi in zip(CONSTANTS, params, lower, upper)
                 if (name in ("c", "d") and v <= lo + 1e-9) or v >= hi * (1 - 1e-6)]
    samples = []
    if bootstrap:
        rng = np.random.default_rng(seed)
        inflate = math.sqrt(n / max(n - len(CONSTANTS), 1))
        centred = (resid - resid.mean()) * inflate
        for _ in range(bootstrap):
            fake = fitted * np.exp(rng.choice(centred, size=n, replace=True))
            s, _, _ = _solve(xs, fake, [params])
            if s is not None:
                samples.append(unscaled(s.x))
    consts = unscaled(params)
    intervals = {}
    if samples:
        arr = np.array(samples)
        for i, name in enumerate(CONSTANTS):
            lo, hi = np.quantile(arr[:, i], [0.05, 0.95])
            intervals[name] = [float(lo), float(hi)]
    return PowerLawFit(*consts, intervals=intervals, x=[float(v) for v in fx],
                       error=[float(v) for v in fe], rms_log_residual=rms, at_bounds=at_bounds,
                       meta={**(meta or {}), "points": int(len(x))}, bootstrap=samples)
