"""The one torch.multiprocessing.spawn launch of four CPU gloo processes (tests/spawning.py) that
tests/test_optim_sharded.py and tests/test_plan_states.py share: a launch costs 7-9 s of process
start-up and imports on a 2-core machine, more than either module's checks. tests/conftest.py's
session fixture `sharded_launch` runs it once, when a test of either module first asks for it
(running one module alone still runs both workers). Each worker writes into its own folder of
the launch's, named after its module; a failure in either fails the launch, with every rank's
traceback, for the tests of both modules.
"""

from __future__ import annotations

import importlib
from pathlib import Path

WORLD = 4
# (module, worker(rank, world, folder)) in the order they run. measure_worker runs last: it
# replaces the default process group of the 4 processes by two groups of 2.
WORKERS = (("test_optim_sharded", "both_workers"), ("test_plan_states", "measure_worker"))


def all_workers(rank: int, world: int, tmp: Path) -> None:
    """Each of WORKERS in turn, on tmp / <its module>. (No barrier between them: every rank
    runs the same collectives in the same order, and each worker's files are its own.)"""
    for module, fn_name in WORKERS:
        folder = tmp / module
        folder.mkdir(exist_ok=True)
        getattr(importlib.import_module(module), fn_name)(rank, world, folder)


def launch(tmp: Path) -> Path:
    """Run all_workers on WORLD processes into tmp (spawning.spawn: a failure raises an
    AssertionError with every rank's traceback); tmp."""
    from spawning import spawn

    spawn("sharded_launch", "all_workers", WORLD, tmp)
    return tmp
