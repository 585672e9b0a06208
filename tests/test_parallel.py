"""vitscale.parallel through `vitscale train`: every sharded layout follows the one-process run.

Each layout is one torchrun launch (gloo, CPU) that trains the 8 runs of tests/parallel_runs.py
(two model shapes x the four optimizers) for 10 steps; the loss of every step and the final
weights must match the same runs in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_runs import runs  # noqa: E402 - tests/ is on sys.path (rootdir conftest)
from vitscale.models import load
from vitscale.train import run

WORKER = Path(__file__).with_name("parallel_runs.py")
# Adam with a bf16 first moment: a rounding difference far below 1e-5 can flip the last bit of a
# bf16 momentum entry, which moves that weight by up to lr x 2^-8 of its update (measured: up
# to 1.6e-5 after 10 steps for adam_bf16, the same under DDP); fp32 state: 1e-5.
ATOL = {"adamw": 1e-5, "sgd": 1e-5, "adam_bf16": 3e-5, "adafactor_bv": 1e-5}


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name, overrides in runs().items():
        run(None, overrides + [f"out_dir={out / name}"])
    return out


def assert_follows(sharded: Path, single: Path) -> None:
    for name in runs():
        optimizer = name.split("-", 1)[1]
        ref, got = losses(single / name), losses(sharded / name)
        assert len(got) == len(ref) == 10, name
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0,
                                   msg=f"{name}: loss trajectory")
        theirs = load(single / name / "model").state_dict()
        ours = load(sharded / name / "model").state_dict()
        for key, value in theirs.items():
            torch.testing.assert_close(compared(key, ours[key], optimizer),
                                       compared(key, value, optimizer), atol=ATOL[optimizer],
                                       rtol=0, msg=f"{name}: {key}")


def compared(key: str, t: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The part of a tensor the comparison holds for. The key bias (the middle third of a
    qkv bias) has a zero gradient in exact arithmetic, softmax ignoring a shift of every logit;
    with no epsilon in its denominator Adafactor turns the rounding noise into +-lr steps in
    any layout (DDP too). Its query and value biases are compared."""
    if optimizer == "adafactor_bv" and key.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.dp_shard=2"]),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
], ids=["fsdp2", "hsdp2x2"])
def test_sharded_layout_follows_one_process(tmp_path, single, nproc, layout):
    proc = torchrun(nproc, str(WORKER), str(tmp_path), *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_follows(tmp_path, single)
    state = json.loads((tmp_path / "vit-adamw" / "checkpoints" / "step-000000010" / "state.json")
                       .read_text())
    assert state["format"] == "dcp" and len(state["rng_per_process"]) == nproc
