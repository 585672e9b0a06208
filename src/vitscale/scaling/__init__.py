"""Scaling laws for ViT shapes."""

from vitscale.scaling.errors import ScalingError
from vitscale.scaling.shape import (
    SOVIT_EXPONENTS,
    DimLaw,
    ShapeFit,
    fit_shape,
    scale_shape,
    shape_overrides,
)

__all__ = [
    "SOVIT_EXPONENTS",
    "DimLaw",
    "ScalingError",
    "ShapeFit",
    "fit_shape",
    "scale_shape",
    "shape_overrides",
]
