"""One torch.multiprocessing.spawn launch of CPU gloo processes running a test module's worker
function, every rank's traceback kept (mp.spawn reports only the first failing rank)."""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init: str, module: str, fn_name: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        getattr(importlib.import_module(module), fn_name)(rank, world, Path(tmp))
    except BaseException:
        (Path(tmp) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(module: str, fn_name: str, world: int, tmp_path: Path) -> None:
    """Run module.fn_name(rank, world, tmp_path) on `world` processes (OMP_NUM_THREADS=1 for
    them only); a failure raises an AssertionError with every rank's traceback."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        try:
            mp.spawn(_worker, args=(world, f"file://{tmp_path / 'init'}", module, fn_name,
                                    str(tmp_path)), nprocs=world, join=True)
        except Exception as exc:
            errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
            raise AssertionError(f"{fn_name} failed:\n{errors or exc}") from None
