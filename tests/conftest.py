"""Tests marked `gpu` run only where CUDA is available; everywhere else they are skipped. The
torchrun launches tests/test_parallel.py reads run once per session (tests/launches.py), and so
does the torch.multiprocessing launch tests/test_optim_sharded.py and tests/test_plan_states.py
share (tests/sharded_launch.py, the fixture `sharded_launch`)."""

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


@pytest.fixture(scope="session")
def sharded_launch(tmp_path_factory):
    """The folder of the session's one launch of 4 CPU gloo processes (tests/sharded_launch.py):
    in it, each worker's own folder, named after its module. A failure of the launch raises here,
    with every rank's traceback, for each test of both modules that asks for it."""
    from sharded_launch import launch

    return launch(tmp_path_factory.mktemp("sharded_launch"))


def pytest_sessionfinish(session):
    if LAUNCHES in session.config.stash:
        session.config.stash[LAUNCHES].close()
