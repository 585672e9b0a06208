"""`vitscale plan` against PyTorch's own accounting, on fake process groups (no collectives run)
and fake tensors (no memory, no arithmetic): about 20 s on an idle 2-core machine, no device.

1. B/16 sharded as `vitscale train` shards it with parallel.dp_shard=8 (FSDP2 per block and on
   the root), AdamW, 16 images per rank, trained two steps under
   `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` (torchtitan's memory estimation
   recipe; tests/plan_fake_mesh.py `track`): the planner's per-rank total is within 10% of the
   tracker's peak, for fp32 and FSDP bf16 parameters, with and without full activation
   checkpointing. Its parameter, gradient and optimizer figures (states.py) are exact.
2. The layout `vitscale plan --table` recommends for 22B/14 on 256 x 80 GiB devices (32 images
   per device, adafactor_bv: the README's table) builds on the meta device on a fake 256-rank
   mesh (tests/plan_fake_mesh.py `layout`), and rank 0 holds exactly the planner's parameter
   bytes.

The three worker processes run side by side (two for the tracker's four settings, one for 22B) so
the two cores are both used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitscale.plan.planner import plan
from vitscale.plan.table import _layouts, smallest_layout

WORKER = Path(__file__).with_name("plan_fake_mesh.py")
BATCH = 16  # images per rank
SETTINGS = [("float32", "none"), ("float32", "full"), ("bfloat16", "none"), ("bfloat16", "full")]
TOLERANCE = 0.10

# 22B/14 on 256 devices, as the README's `vitscale plan --table --batch 32 --optim adafactor_bv`
TABLE = dict(batch=32, optim="adafactor_bv", device_memory="80GiB")
DEVICES = 256

# The tracker's categories (_FSDPRefType) summed under the planner field they correspond to.
GROUPS = {
    "params_bytes": ("Sharded Param", "Buffer"),
    "grads_bytes": ("Sharded Grad",),
    "optimizer_bytes": ("OptState",),
    "fsdp_buffers_bytes": ("Unsharded Param", "All Gather", "Unsharded Grad", "Reduce Scatter"),
    "comm_buffers_bytes": (),  # DDP's buckets: none under FSDP
    # Temp: what backward allocates outside checkpointed regions (activation gradients, and here
    # the recomputed block too); Inputs: the batch (the fp32 image is what the stem's conv saves)
    "activations_bytes": ("Activation", "Temp", "Inputs"),
}


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rows(proc: subprocess.Popen) -> list[dict]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def measured():
    """{(param_dtype, act_ckpt): the tracker's row, "22B": (label, plan keywords, worker row)}."""
    procs: list[subprocess.Popen] = []
    try:
        for dtype in ("float32", "bfloat16"):
            settings = [{"param_dtype": d, "act_ckpt": a} for d, a in SETTINGS if d == dtype]
            procs.append(_start("track", json.dumps(settings), str(BATCH)))
        # the planner's choice, computed here while the tracker runs
        label = smallest_layout("22B/14", DEVICES, **TABLE)
        assert label is not None, "no layout fits 22B/14 on 256 x 80GiB"
        keywords = dict(_layouts(DEVICES))[label]
        procs.append(_start("layout", "22B/14", json.dumps(keywords), str(DEVICES)))
        rows = {(r["param_dtype"], r["act_ckpt"]): r for proc in procs[:2] for r in _rows(proc)}
        (built,) = _rows(procs[2])
    finally:  # none left running when one fails
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    rows["22B"] = (label, keywords, built)
    return rows


def _table(peak: dict[str, int], planned) -> str:
    mib = 2**20
    lines = [f"{'plan field':<20}{'plan MiB':>10}{'tracker MiB':>13}  tracker categories (MiB)"]
    for field, names in GROUPS.items():
        ours = sum(peak[n] for n in names)
        parts = ", ".join(f"{n} {peak[n] / mib:.2f}" for n in names) or "-"
        lines.append(f"{field:<20}{getattr(planned, field) / mib:>10.2f}{ours / mib:>13.2f}  {parts}")
    lines.append(f"{'total_bytes':<20}{planned.total_bytes / mib:>10.2f}{peak['Total'] / mib:>13.2f}  "
                 f"plan / tracker = {planned.total_bytes / peak['Total']:.4f}")
    return "\n".join(lines)


@pytest.mark.parametrize(("param_dtype", "act_ckpt"), SETTINGS)
def test_planner_total_agrees_with_fsdp_mem_tracker(measured, param_dtype, act_ckpt):
    row = measured[(param_dtype, act_ckpt)]
    assert row["batch"] == BATCH
    # The attention kernel that ran: SDPA on CPU (fake) tensors, no mask, no dropout, picks the
    # fused CPU flash kernel in fp32 and in bf16 alike (the math path, which would upcast bf16,
    # is not taken). It saves q, k, v, the output and an fp32 logsumexp: the planner's "flash".
    # `device` only matters to the planner for kernel="math", but the tensors are CPU tensors.
    compute = "bfloat16" if param_dtype == "bfloat16" else "float32"
    assert {tuple(k) for k in row["attention"]} == {
        ("aten._scaled_dot_product_flash_attention_for_cpu.default", compute),
        ("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", compute)}, row
    # precision fp32: the trainer's autocast is off; param_dtype=bfloat16 is FSDP2's cast of the
    # gathered parameters (and the root's inputs), which the planner models as all-bf16 compute
    planned = plan("B/16", img_size=224, batch=BATCH, precision="fp32", optim="adamw", dp_shard=8,
                   act_ckpt=act_ckpt, param_dtype=param_dtype, kernel="flash", device="cpu",
                   margin=0)
    peak = row["peak"]
    report = _table(peak, planned)
    print(f"\nB/16, dp_shard=8, {BATCH} images per rank, param_dtype={param_dtype}, "
          f"act_ckpt={act_ckpt}, AdamW (peak over two steps)\n{report}")
    covered = {n for names in GROUPS.values() for n in names}
    assert covered == set(peak) - {"Total"}, peak  # every tracker category is in the table
    assert sum(peak[n] for n in covered) == peak["Total"]
    assert abs(planned.total_bytes - peak["Total"]) <= TOLERANCE * peak["Total"], report
    # states.py is exact: the sharded fp32 parameters and AdamW's state (both whole at the
    # peak), the sharded fp32 gradients once the backward pass has produced all of them
    assert peak["Sharded Param"] == planned.params_bytes, report
    assert peak["OptState"] == planned.optimizer_bytes, report
    assert row["after_backward"]["Sharded Grad"] == planned.grads_bytes, row["after_backward"]


def test_recommended_22b_layout_builds_on_meta_over_a_fake_256_rank_mesh(measured):
    label, keywords, built = measured["22B"]
    planned = plan("22B/14", **keywords, **TABLE)
    print(f"\n22B/14 on {DEVICES} x 80GiB, {TABLE['batch']} images per device, adafactor_bv: "
          f"{label} {keywords}; rank 0 holds {built['local_bytes']} parameter bytes, the plan "
          f"{planned.params_bytes}; plan total {planned.total_bytes / 2**30:.2f} GiB")
    assert planned.fits
    assert built["layout"] == keywords and built["world"] == DEVICES
    layout = keywords["dp_replicate"] * keywords["dp_shard"] * keywords["tp"]
    assert layout == DEVICES
    assert built["all_meta"] and built["all_dtensor"], built  # sharded, nothing allocated
    assert built["dtypes"] == ["torch.float32"], built  # the fp32 master weights
    assert built["total_numel"] == planned.params > 21.7e9  # the whole ViT-22B
    assert built["local_bytes"] == planned.params_bytes, (built, planned.params_bytes)
    # about 1 / (dp_shard x tp) of it: sharding gives rank 0 the first (largest) rows
    share = built["local_numel"] / built["total_numel"]
    assert 1 <= share * keywords["dp_shard"] * keywords["tp"] < 1.01, share
