"""Figures drawn on their own Agg canvas: no pyplot, so matplotlib's global backend (a notebook's
inline or interactive one) is left as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitscale.utils.io import atomic_write


def figure(**kwargs: Any):
    """A matplotlib Figure with an Agg canvas attached (kwargs: figsize, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path, dpi: int = 90) -> Path:
    """Lay out `fig` and write it as a PNG at `path`, atomically."""
    fig.tight_layout()
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=dpi))
