"""Tests marked `gpu` run only where CUDA is available; everywhere else they are skipped. The
torchrun launches tests/test_parallel.py reads run once per session (tests/launches.py), and so
does the torch.multiprocessing launch tests/test_optim_sharded.py and tests/test_plan_states.py
share (tests/sharded_launch.py, the fixture `sharded_launch`). `digits_teacher` is the small
trained ViT that test_eval's evaluators and test_distill's teacher share."""

from __future__ import annotations

import pytest
import torch

LAUNCHES = pytest.StashKey()
CACHE = pytest.StashKey()


def pytest_configure(config):
    """The digits cache (vitscale.utils.cache) in a folder of this session, shared with every
    process the tests launch (they inherit the environment), not the user's ~/.cache."""
    import os
    import tempfile

    if not os.environ.get("VITSCALE_CACHE"):
        config.stash[CACHE] = tempfile.TemporaryDirectory(prefix="vitscale-cache-")
        os.environ["VITSCALE_CACHE"] = config.stash[CACHE].name


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


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """(run directory, test accuracy) of a small ViT trained on digits at 16 px (learned posemb,
    GAP; 0.74 test accuracy). Batch 32 (0.80 with 64 at 1.7x the time) is enough for every claim
    of the tests that use it."""
    from pathlib import Path

    from vitscale.config import load_config
    from vitscale.train import run

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    out = tmp_path_factory.mktemp("digits-teacher")
    result = run(load_config(demo, [
        "model.name=Ti/2", "model.overrides.width=64", "model.overrides.depth=2",
        "model.overrides.heads=4", "model.overrides.mlp_dim=128", "model.overrides.posemb=learn",
        "model.overrides.pool=gap", "data.img_size=16", "data.batch_size=32",
        "data.crop_scale_min=0.3", "progress=false", "steps=300", "eval_every=300",
        f"out_dir={out}"]))
    return out, result.metrics["test/accuracy"]


def pytest_unconfigure(config):
    if CACHE in config.stash:
        config.stash[CACHE].cleanup()


def pytest_sessionfinish(session):
    if LAUNCHES in session.config.stash:
        session.config.stash[LAUNCHES].close()
