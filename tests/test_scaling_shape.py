"""vitscale.scaling.shape: SoViT's per-dimension scaling law, its fit and the shape rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vitscale.models import count, model_config
from vitscale.scaling import SOVIT_EXPONENTS, ScalingError, ShapeFit, fit_shape, scale_shape, shape_overrides

# A synthetic star sweep: each dimension varied 16x around a centre shape, at 4 budgets spanning 30x.
CENTRE = {"width": 64.0, "depth": 4.0, "mlp_dim": 256.0}
BUDGETS = np.geomspace(1e17, 3e18, 4)  # FLOPs
T_MID = float(np.sqrt(BUDGETS[0] * BUDGETS[-1]))
TRUE_C = 0.35
TRUE_AB = {"width": (0.6, 0.8), "depth": (0.5, 0.7), "mlp_dim": (0.45, 0.6)}  # (a_k, b_k)


def true_laws() -> dict[str, dict[str, float]]:
    """Constants in the caller's units. beta_k puts the optimum exactly at the centre shape at the
    middle budget, so over the budgets it stays inside the sampled x range; an optimum outside
    the range would leave the law unidentifiable (only one side of the valley is seen)."""
    laws = {}
    for k, (a, b) in TRUE_AB.items():
        xc = CENTRE[k]
        alpha = 0.12 * xc**a  # 0.12 error from the small-model term at the centre
        beta = a * alpha * T_MID**TRUE_C / (b * xc ** (a + b))  # d f / d x = 0 at (xc, T_MID)
        laws[k] = dict(alpha=alpha, a=a, beta=beta, b=b, xi=0.02 * T_MID**TRUE_C, eps=0.03)
    return laws


def true_error(law: dict[str, float], x: float, t: float) -> float:
    return (law["alpha"] * x ** -law["a"] + (law["beta"] * x ** law["b"] + law["xi"]) * t**-TRUE_C
            + law["eps"])


def true_optimum(law: dict[str, float], t: float) -> float:
    a, b = law["a"], law["b"]
    return (a * law["alpha"] * t**TRUE_C / (b * law["beta"])) ** (1 / (a + b))


def star_sweep(noise: float = 0.01, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    points = []
    for k, law in true_laws().items():
        for x in CENTRE[k] * np.geomspace(0.25, 4, 5):
            for t in BUDGETS:
                err = true_error(law, x, t) * math.exp(noise * rng.standard_normal())
                points.append(dict(dim=k, x=float(x), compute=float(t), error=err))
    return points


@pytest.fixture(scope="module")
def sweep_fit() -> ShapeFit:
    return fit_shape(star_sweep())


def test_fit_recovers_exponents(sweep_fit):
    # With 1% noise the fit beats the true constants' residual (it is the noise, not the
    # optimiser, that limits this); over 24 seeds the worst |s_k error| was 0.02 / 0.02 / 0.029.
    got = sweep_fit.exponents()
    for k, (a, b) in TRUE_AB.items():
        want = TRUE_C / (a + b)
        assert abs(got[k] - want) < 0.03, f"{k}: s fitted {got[k]:.3f}, true {want:.3f}"
    assert sweep_fit.n_points == 60
    assert sweep_fit.rms < 0.015  # about the 1% noise in log error


def test_fit_optimum_and_prediction(sweep_fit):
    t = float(BUDGETS[1])  # an intermediate budget, not the normalisation centre
    got = sweep_fit.optimal(t)
    for k, law in true_laws().items():
        want = true_optimum(law, t)
        assert abs(got[k] / want - 1) < 0.10, f"{k}: optimum fitted {got[k]:.3f}, true {want:.3f}"
        x = CENTRE[k]
        assert sweep_fit.predict(k, x, t) == pytest.approx(true_error(law, x, t), rel=0.03)


def test_fit_is_deterministic():
    points = star_sweep(seed=1)
    assert fit_shape(points).to_dict() == fit_shape(points).to_dict()


def test_sovit_rule_reproduces_sovit_400m():
    # SoViT-150m (width 880, depth 18, MLP 2320) scaled by the compute of ViT-g/14 on 16B
    # examples over ViT-B/14 on 4B examples should land near SoViT-400m (1152, 27, 4304),
    # the paper's published shapes. "g/14" is a registered vitscale name (1408 / 40 / 6144 / 16).
    g = model_config("g/14", img_size=224, num_classes=0)
    assert (g.width, g.depth, g.mlp_dim, g.heads) == (1408, 40, 6144, 16)
    flops_g = count(g).flops
    flops_b = count(model_config("B/14", img_size=224, num_classes=0)).flops
    ratio = flops_g * 16e9 / (flops_b * 4e9)
    got = scale_shape({"width": 880, "depth": 18, "mlp_dim": 2320}, ratio, SOVIT_EXPONENTS)
    sovit_400m = {"width": 1152, "depth": 27, "mlp_dim": 4304}
    msg = (f"ratio {ratio:.1f}: rule gives width {got['width']:.0f}, depth {got['depth']:.1f}, "
           f"mlp_dim {got['mlp_dim']:.0f} vs SoViT-400m 1152 / 27 / 4304")
    for k, want in sovit_400m.items():
        assert abs(got[k] / want - 1) < 0.20, msg


def test_scale_shape_default_and_identity():
    shape = {"width": 880.0, "depth": 18.0, "mlp_dim": 2320.0}
    assert scale_shape(shape, 1.0) == shape
    assert scale_shape(shape, 8.0)["depth"] == pytest.approx(18 * 8 ** (0.45 / 3))


def _one_line_error(points, *words):
    with pytest.raises(ScalingError) as info:
        fit_shape(points)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_too_few_x_values():
    points = [p for p in star_sweep() if not (p["dim"] == "depth" and p["x"] > 2.5)]
    _one_line_error(points, "depth", "2 distinct x", "star sweep")


def test_single_compute_value():
    points = [p for p in star_sweep() if p["compute"] == BUDGETS[0]]
    _one_line_error(points, "1 distinct compute", "star sweep")


def test_fewer_points_than_parameters():
    # one dimension, 3 x values at 2 budgets: 6 points for 7 parameters
    points = [p for p in star_sweep() if p["dim"] == "width" and p["x"] <= 64 and p["compute"] <= BUDGETS[1]]
    assert len(points) == 6
    _one_line_error(points, "6 points for 7 parameters")


@pytest.mark.parametrize("key, value, words", [
    ("x", 0.0, ("x must be", "> 0")),
    ("compute", -1.0, ("compute must be", "> 0")),
    ("error", 1.5, ("error must lie in (0, 1)",)),
    ("dim", "heads", ("'heads' is not one of",)),
])
def test_bad_values(key, value, words):
    points = star_sweep()
    points[3] = dict(points[3], **{key: value})
    _one_line_error(points, "point 3", *words)


def test_round_trip(sweep_fit):
    back = ShapeFit.from_dict(json.loads(json.dumps(sweep_fit.to_dict())))
    assert back == sweep_fit
    with pytest.raises(ScalingError, match="not a ShapeFit dict"):
        ShapeFit.from_dict({"c": 0.3})


def test_shape_overrides():
    got = shape_overrides({"width": 1170.0, "depth": 26.6, "mlp_dim": 4301.0}, head_dim=64)
    assert got == {"width": 1152, "depth": 27, "mlp_dim": 4300, "heads": 18}
    assert shape_overrides({"width": 10.0, "depth": 0.2, "mlp_dim": 1.0}, head_dim=64) == {
        "width": 64, "depth": 1, "mlp_dim": 4, "heads": 1}
    with pytest.raises(ScalingError, match="head_dim"):
        shape_overrides({"width": 1.0, "depth": 1.0, "mlp_dim": 1.0}, head_dim=0)
