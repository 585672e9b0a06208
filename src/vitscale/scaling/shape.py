"""SoViT's per-dimension scaling law ("Getting ViT in Shape", arXiv 2305.13035).

For one shape dimension k (width, depth or MLP size) with value x, trained with compute t:

    f_k(x, t) = alpha_k * x^(-a_k) + (beta_k * x^(b_k) + xi_k) * t^(-c) + eps_k

The first term is what a too-small model loses, the second what a too-large model loses for
being undertrained; c is shared by all dimensions. Setting d f_k / d x = 0 gives the
compute-optimal x*_k(t) = (a_k alpha_k t^c / (b_k beta_k))^(1 / (a_k + b_k)), which grows as
t^(s_k) with s_k = c / (a_k + b_k).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

from vitscale.scaling.errors import ScalingError

DIMS = ("width", "depth", "mlp_dim")

# The paper's compute-optimal exponents s_k (ImageNet 10-shot).
SOVIT_EXPONENTS: dict[str, float] = {"width": 0.22, "depth": 0.45, "mlp_dim": 0.6}

_PER_DIM = 6  # alpha, a, beta, b, xi, eps
_MIN_X, _MIN_T = 3, 2  # distinct values per dimension the law needs to be pinned down
_EXP_LO, _EXP_HI = 1e-3, 4.0  # exponents must stay > 0; beyond 4 nothing physical
_CONST_HI = 1e3  # in normalised units constants are of the order of the errors (< 1)
_STAR_HINT = "a star sweep varies each dimension around a centre shape at several compute budgets"


@dataclass(frozen=True)
class DimLaw:
    """The constants of one dimension, in the caller's units of x and compute."""

    alpha: float
    a: float
    beta: float
    b: float
    xi: float
    eps: float


@dataclass(frozen=True)
class ShapeFit:
    """A joint fit of the law over the dimensions present in a sweep."""

    dims: dict[str, DimLaw]
    c: float
    n_points: int
    rms: float  # residual RMS of log(error)

    def exponents(self) -> dict[str, float]:
        """s_k: the compute-optimal x grows as compute^(s_k)."""
        return {k: self.c / (law.a + law.b) for k, law in self.dims.items()}

    def optimal(self, compute: float) -> dict[str, float]:
        """x*_k at this compute, from d f_k / d x = 0."""
        _check_positive("compute", compute)
        out = {}
        for k, law in self.dims.items():
            if law.beta == 0.0:  # bigger is always better: no finite optimum
                out[k] = math.inf
            else:
                ratio = law.a * law.alpha * compute**self.c / (law.b * law.beta)
                out[k] = ratio ** (1.0 / (law.a + law.b))
        return out

    def predict(self, dim: str, x: float, compute: float) -> float:
        """The law's error for value x of `dim` trained with `compute`."""
        if dim not in self.dims:
            raise ScalingError(f"dimension {dim!r} is not in this fit; use one of {sorted(self.dims)}")
        _check_positive("x", x)
        _check_positive("compute", compute)
        law = self.dims[dim]
        return law.alpha * x**-law.a + (law.beta * x**law.b + law.xi) * compute**-self.c + law.eps

    def to_dict(self) -> dict:
        return {"c": self.c, "n_points": self.n_points, "rms": self.rms,
                "dims": {k: asdict(law) for k, law in self.dims.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> ShapeFit:
        try:
            dims = {str(k): DimLaw(**{f: float(v[f]) for f in DimLaw.__dataclass_fields__})
                    for k, v in data["dims"].items()}
            return cls(dims=dims, c=float(data["c"]), n_points=int(data["n_points"]),
                       rms=float(data["rms"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ScalingError(f"not a ShapeFit dict ({type(exc).__name__}: {exc}); "
                               "give the output of ShapeFit.to_dict()") from None


def _check_positive(name: str, value: float) -> None:
    # numbers.Real also takes numpy scalars; bool is an int but never a size.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ScalingError(f"{name} must be a finite number > 0, got {value!r}")


def _read_points(points: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Validate the points and group them per dimension as rows (x, compute, error)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for i, p in enumerate(points):
        missing = [key for key in ("dim", "x", "compute", "error") if key not in p]
        if missing:
            raise ScalingError(f"point {i} lacks {missing}; give dicts with dim, x, compute, error")
        dim = p["dim"]
        if dim not in DIMS:
            raise ScalingError(f"point {i}: dim {dim!r} is not one of {list(DIMS)}")
        for key in ("x", "compute"):
            _check_positive(f"point {i}: {key}", p[key])
        err = p["error"]
        if isinstance(err, bool) or not isinstance(err, numbers.Real) or not 0 < err < 1:
            raise ScalingError(f"point {i}: error must lie in (0, 1), got {err!r}; give an error rate")
        rows.setdefault(dim, []).append((float(p["x"]), float(p["compute"]), float(err)))
    if not rows:
        raise ScalingError(f"no points to fit; {_STAR_HINT}")
    return {k: np.array(v) for k, v in rows.items()}


def _check_coverage(data: dict[str, np.ndarray]) -> None:
    for k, arr in data.items():
        n_x, n_t = len(np.unique(arr[:, 0])), len(np.unique(arr[:, 1]))
        if n_x < _MIN_X or n_t < _MIN_T:
            raise ScalingError(f"{k} has {n_x} distinct x and {n_t} distinct compute values, needs "
                               f">= {_MIN_X} and >= {_MIN_T}; {_STAR_HINT}")
    n_points = sum(len(arr) for arr in data.values())
    n_params = _PER_DIM * len(data) + 1
    if n_points <= n_params:
        raise ScalingError(f"{n_points} points for {n_params} parameters, need more points than "
                           f"parameters; {_STAR_HINT}")


def _law(theta: np.ndarray, u: np.ndarray, v: np.ndarray, c: float) -> np.ndarray:
    alpha, a, beta, b, xi, eps = theta
    return alpha * u**-a + (beta * u**b + xi) * v**-c + eps


def _starts(data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Deterministic starting points: a small grid over the exponents, constants from the data."""
    starts = []
    for a0, b0, c0 in itertools.product((0.25, 0.75), (0.25, 0.75), (0.2, 0.5)):
        theta = []
        for arr in data.values():
            floor, spread = 0.5 * arr[:, 2].min(), np.median(arr[:, 2]) - 0.5 * arr[:, 2].min()
            # In normalised units each term is about its share of the error above the floor.
            theta += [spread / 2, a0, spread / 3, b0, spread / 6, floor]
        starts.append(np.array([*theta, c0]))
    return starts


def fit_shape(points: Sequence[Mapping]) -> ShapeFit:
    """Fit the law jointly over the dimensions present (c shared) by least squares in log error."""
    data = _read_points(points)
    _check_coverage(data)
    dims = list(data)
    # Divide x and compute by their geometric means so the constants are all of order one.
    x_scale = {k: float(np.exp(np.log(data[k][:, 0]).mean())) for k in dims}
    all_t = np.concatenate([data[k][:, 1] for k in dims])
    t_scale = float(np.exp(np.log(all_t).mean()))
    normed = {k: (data[k][:, 0] / x_scale[k], data[k][:, 1] / t_scale, np.log(data[k][:, 2]))
              for k in dims}

    def residuals(params: np.ndarray) -> np.ndarray:
        c = params[-1]
        parts = []
        for i, k in enumerate(dims):
            u, v, log_err = normed[k]
            pred = _law(params[i * _PER_DIM:(i + 1) * _PER_DIM], u, v, c)
            parts.append(np.log(np.maximum(pred, 1e-300)) - log_err)
        return np.concatenate(parts)

    lo_dim = [0.0, _EXP_LO, 0.0, _EXP_LO, 0.0, 0.0]
    hi_dim = [_CONST_HI, _EXP_HI, _CONST_HI, _EXP_HI, _CONST_HI, 1.0]
    lower = np.array(lo_dim * len(dims) + [_EXP_LO])
    upper = np.array(hi_dim * len(dims) + [_EXP_HI])
    best = None
    for x0 in _starts(data):
        res = least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper),
                            method="trf", x_scale="jac", max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    return _to_caller_units(best.x, dims, x_scale, t_scale, best.fun)


def _to_caller_units(params: np.ndarray, dims: list[str], x_scale: dict[str, float],
                     t_scale: float, resid: np.ndarray) -> ShapeFit:
    """Undo the normalisation: with u = x / gx and v = t / gt,
    A u^-a = (A gx^a) x^-a, B u^b v^-c = (B gx^-b gt^c) x^b t^-c, Xi v^-c = (Xi gt^c) t^-c."""
    c = float(params[-1])
    laws = {}
    for i, k in enumerate(dims):
        alpha, a, beta, b, xi, eps = (float(p) for p in params[i * _PER_DIM:(i + 1) * _PER_DIM])
        gx = x_scale[k]
        laws[k] = DimLaw(alpha=alpha * gx**a, a=a, beta=beta * gx**-b * t_scale**c, b=b,
                         xi=xi * t_scale**c, eps=eps)
    rms = float(np.sqrt(np.mean(resid**2)))
    return ShapeFit(dims=laws, c=c, n_points=len(resid), rms=rms)


def scale_shape(shape: Mapping[str, float], ratio: float,
                exponents: Mapping[str, float] = SOVIT_EXPONENTS) -> dict[str, float]:
    """SoViT's rule for spending `ratio` times the compute on `shape`: each dimension is
    multiplied by ratio^(s_k / 3), the three dimensions sharing the increase."""
    _check_positive("ratio", ratio)
    unknown = [k for k in shape if k not in exponents]
    if unknown:
        raise ScalingError(f"no exponent for {unknown}; give exponents for every key of the shape "
                           f"(have {sorted(exponents)})")
    for k, v in shape.items():
        _check_positive(f"shape {k}", v)
    return {k: float(v) * ratio ** (exponents[k] / 3.0) for k, v in shape.items()}


def shape_overrides(shape: Mapping[str, float], head_dim: int) -> dict[str, int]:
    """Round a (possibly fractional) shape to the integer settings of a vitscale model config:
    width a whole number of heads of `head_dim`, MLP size a multiple of 4."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim <= 0:
        raise ScalingError(f"head_dim must be a positive integer, got {head_dim!r}")
    missing = [k for k in DIMS if k not in shape]
    if missing:
        raise ScalingError(f"shape lacks {missing}; give width, depth and mlp_dim")
    for k in DIMS:
        _check_positive(f"shape {k}", shape[k])
    head_dim = int(head_dim)
    heads = max(1, round(shape["width"] / head_dim))
    return {"width": heads * head_dim, "depth": max(1, round(shape["depth"])),
            "mlp_dim": max(1, round(shape["mlp_dim"] / 4)) * 4, "heads": heads}
