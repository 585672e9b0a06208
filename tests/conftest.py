"""Tests marked `gpu` run only where CUDA is available; everywhere else they are skipped. The
torchrun launches tests/test_parallel.py reads run once per session (tests/launches.py)."""

from __future__ import annotations

import pytest
import torch

LAUNCHES = pytest.StashKey()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def launches(config):
    """The session's tests/launches.Launches."""
    from launches import Launches

    if LAUNCHES not in config.stash:
        config.stash[LAUNCHES] = Launches()
    return config.stash[LAUNCHES]


def pytest_sessionfinish(session):
    if LAUNCHES in session.config.stash:
        session.config.stash[LAUNCHES].close()
