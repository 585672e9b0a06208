"""An on-disk cache of derived arrays: the built-in digits set and its fixed stratified splits.

Computing them imports scikit-learn (seconds per process); every worker of a torchrun launch
would pay that again, so the arrays are kept after the first computation. Folder: $VITSCALE_CACHE,
else $XDG_CACHE_HOME/vitscale, else ~/.cache/vitscale. The file name hashes everything the arrays
depend on (scikit-learn's version included), so a stale entry is never read; an unreadable entry
is recomputed, an unwritable folder only costs the recomputation.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitscale.utils.io import atomic_write


def cache_dir() -> Path:
    if os.environ.get("VITSCALE_CACHE"):
        return Path(os.environ["VITSCALE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitscale"


def sklearn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scikit-learn")
    except PackageNotFoundError:
        return "none"


def cached_arrays(name: str, key: str, compute: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, read from the cache entry for (`name`, `key`) when there is one."""
    path = cache_dir() / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    arrays = compute()
    try:
        atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
    except OSError:
        pass
    return arrays
