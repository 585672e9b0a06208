"""Errors a user can cause in the scaling-law tools."""

from __future__ import annotations

from vitscale.errors import UserError


class ScalingError(UserError):
    """Unusable sweep points, a malformed fit or a shape that cannot be scaled."""
