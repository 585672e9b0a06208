"""Scaling studies: sweeps of training runs, Scaling ViT's saturating power law, SoViT's shapes.

    vitscale sweep --config BASE.yaml --grid 'model.name=[Ti/4,S/4]' --grid 'epochs=[5,10]' --out DIR
    vitscale scaling fit DIR          # fit.json, fit.png: E = a (C + d)^-b + c on the frontier
    vitscale scaling predict DIR/fit.json --compute 1e15 | --error 0.1
    vitscale scaling shape STAR_DIR --compute 1e15 | --from S/16 --ratio 8

`sweep.py` (grid and star sweeps, resumable, index), `points.py` ((x, error) points from runs or
a CSV), `fit.py` (the power law, bootstrap intervals, prediction), `shape.py` (SoViT's
per-dimension law, exponents, compute-optimal shape, the ratio^(s/3) rule), `study.py` (what
the commands call: fit.json / fit.png, a star sweep's shape study).
"""

from vitscale.scaling.errors import ScalingError
from vitscale.scaling.fit import CORE_DAY_FLOPS, PowerLawFit, fit_power_law, pareto_frontier
from vitscale.scaling.points import read_points
from vitscale.scaling.shape import (
    SOVIT_EXPONENTS,
    DimLaw,
    ShapeFit,
    fit_shape,
    scale_shape,
    shape_overrides,
)
from vitscale.scaling.study import fit_runs, read_fit, shape_study, star_points
from vitscale.scaling.sweep import read_index, run_sweep, sweep_points

__all__ = [
    "CORE_DAY_FLOPS",
    "SOVIT_EXPONENTS",
    "DimLaw",
    "PowerLawFit",
    "ScalingError",
    "ShapeFit",
    "fit_power_law",
    "fit_runs",
    "fit_shape",
    "pareto_frontier",
    "read_fit",
    "read_index",
    "read_points",
    "run_sweep",
    "scale_shape",
    "shape_overrides",
    "shape_study",
    "star_points",
    "sweep_points",
]
