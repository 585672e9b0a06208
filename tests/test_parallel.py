"""vitscale.parallel through `vitscale train`: every sharded layout follows the one-process run.

Two torchrun launches (gloo, CPU; tests/parallel_runs.py LAUNCHES) train FSDP 2 and TP 2 on two
processes, FSDP x TP 2 x 2 and HSDP 2 x 2 on four, each run 10 steps of a ViT-22B-shaped model
(parallel blocks, QK-norm, no biases, MAP head) or a class-token ViT with one of the four
optimizers; the loss of every step and the final weights must match the same run in one
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launches import WORKER, torchrun, torchrun_command  # tests/ is on sys.path (pytest's rootdir insertion)
from parallel_runs import (
    BASE,
    EXTRA,
    LAUNCHES,
    MESH_SOURCE,
    PRETRAIN_DDP,
    REFUSED,
    reference,
    runs,
    settings,
    with_teacher,
)
from vitscale.models import load
from vitscale.train import run

# Adam with a bf16 first moment: a rounding difference far below 1e-5 can flip the last bit of a
# bf16 momentum entry, which moves that weight by up to lr x 2^-8 of its update (measured: up
# to 1.6e-5 after 10 steps for adam_bf16, the same under DDP); fp32 state: 1e-5.
ATOL = {"adamw": 1e-5, "sgd": 1e-5, "adam_bf16": 3e-5, "adafactor_bv": 1e-5}


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def weights(run_dir: Path, folder: str = "model") -> dict[str, torch.Tensor]:
    return load(run_dir / folder).state_dict()


@pytest.fixture(scope="module")
def launched(request):
    """launched(name) -> (the folder of that torchrun launch of parallel_runs.py, its stdout),
    once per session (started in the background by conftest.py)."""
    from conftest import launches

    def launch(name: str) -> tuple[Path, str]:
        out, proc = launches(request.config).result(name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc.stdout

    launch.stderr = lambda name: launches(request.config).result(name)[1].stderr
    return launch


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    needed = {reference(name) for _, layouts in LAUNCHES.values() for _, names in layouts.values()
              for name in names} | {EXTRA[name][0] for name in ("bf16", "mix")}
    for name, overrides in runs().items():
        if name in needed:  # the one-process runs some sharded run is compared with
            run(None, overrides + [f"out_dir={out / name}"])
    return out


def assert_run_follows(got: Path, ref: Path, optimizer: str) -> None:
    want, have = losses(ref), losses(got)
    assert len(have) == len(want) == 10, got
    torch.testing.assert_close(torch.tensor(have), torch.tensor(want), atol=1e-5, rtol=0,
                               msg=f"{got.name}: loss trajectory")
    theirs, ours = weights(ref), weights(got)
    for key, value in theirs.items():
        torch.testing.assert_close(compared(key, ours[key], optimizer),
                                   compared(key, value, optimizer), atol=ATOL[optimizer],
                                   rtol=0, msg=f"{got}: {key}")


def compared(key: str, t: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The part of a tensor the comparison holds for. The key bias (the middle third of a
    qkv bias) has a zero gradient in exact arithmetic, softmax ignoring a shift of every logit;
    with no epsilon in its denominator Adafactor turns the rounding noise into +-lr steps in
    any layout (DDP too). Its query and value biases are compared."""
    if optimizer == "adafactor_bv" and key.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


LAYOUTS = [(launch, layout) for launch, (_, layouts) in LAUNCHES.items() for layout in layouts]


@pytest.mark.parametrize("launch, layout", LAYOUTS, ids=[layout for _, layout in LAYOUTS])
def test_sharded_layout_follows_one_process(launched, single, tmp_path, launch, layout):
    out, _ = launched(launch)
    nproc, layouts = LAUNCHES[launch]
    names = layouts[layout][1]
    for name in names:  # sequence parallel, checkpointing, accumulation... change no number
        if reference(name):
            assert_run_follows(out / layout / name, single / reference(name),
                               reference(name).split("-", 1)[1])
    state = json.loads((out / layout / names[0] / "checkpoints" / "step-000000010" / "state.json")
                       .read_text())
    assert state["format"] == "dcp" and len(state["rng_per_process"]) == nproc
    got = out / layout
    if "asvit" in names:  # FSDP over As-ViT stages, re-tokenized half way
        run(None, settings("asvit") + [f"out_dir={tmp_path / 'asvit'}"])
        assert_run_follows(got / "asvit", tmp_path / "asvit", "adamw")
        last = [r for r in map(json.loads, (got / "asvit" / "metrics.jsonl").open())
                if "tokenizer" in r][-1]
        assert last["tokenizer"] == [4, 1]
    if "mix" in names:  # Mixup / CutMix on the batch both TP ranks hold
        run(None, settings("mix") + [f"out_dir={tmp_path / 'mix'}"])
        assert_run_follows(got / "mix", tmp_path / "mix", "adamw")
        assert losses(got / "mix") != losses(single / "vit-adamw")  # the batches were mixed
    if "features" in names:  # accumulation, EMA, the periodic few-shot evaluator
        assert (got / "features" / "model_ema" / "model.safetensors").is_file()
        rows = [json.loads(line) for line in (got / "features" / "metrics.jsonl").open()]
        shots = [r for r in rows if r.get("split") == "fewshot"]
        assert [r["step"] for r in shots] == [5, 10] and 0 < shots[-1]["fewshot/2shot"] <= 1
        # The few-shot row of the final weights equals the standalone evaluator's on model/.
        from vitscale.config import load_config
        from vitscale.data import build_data
        from vitscale.eval import fewshot_model

        cfg = load_config(got / "features" / "config.yaml")
        alone = fewshot_model(load(got / "features" / "model"), build_data(cfg.data, cfg.seed),
                              [1, 2], 1)
        assert shots[-1]["fewshot/2shot"] == pytest.approx(alone["results"][1]["mean"], abs=1e-9)
    if "distill" in names:  # a sharded frozen teacher: the one-process distillation exactly
        run(None, with_teacher("distill", tmp_path) + [f"out_dir={tmp_path / 'distill'}"])
        assert_run_follows(got / "distill", tmp_path / "distill", "adamw")
        assert losses(got / "distill") != losses(single / "vit-adamw")  # the teacher taught
        ours, theirs = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
                        for d in (got / "distill", tmp_path / "distill"))
        for key in ("test/agreement", "test/kl", "test/teacher_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    if "bf16" in names:  # bf16 gathered weights and autocast; fp32 reduction and master weights
        have, want = losses(got / "bf16"), losses(single / EXTRA["bf16"][0])
        assert have != want  # the forward really ran in bf16
        torch.testing.assert_close(torch.tensor(have), torch.tensor(want), atol=2e-2, rtol=0)
        assert all(t.dtype == torch.float32 for t in weights(got / "bf16").values())


# ------------------------------------------------------------------ sharded checkpoints
RESUME = settings("resume")


def train_cmd(out: Path, *extra: str) -> list[str]:
    return ["-m", "vitscale.cli", "train", *RESUME, *extra, f"out_dir={out}"]


def test_sharded_sigkill_then_resume_is_bitwise_identical(tmp_path, launched):
    import random
    import signal
    import time

    layout = LAUNCHES["two"][1]["fsdp2"][0]
    reference = launched("two")[0] / "fsdp2" / "resume"  # the same run, uninterrupted

    # SIGKILL the whole torchrun process group once a random checkpoint is in place.
    killed = tmp_path / "killed"
    target = random.choice([3, 6])  # not the last checkpoint: the run must still be going
    cmd, env = torchrun_command(2, *train_cmd(killed, *layout))
    runner = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 200
    while runner.poll() is None and time.monotonic() < deadline:
        if pointer.exists() and int(pointer.read_text().split("-")[1]) >= target:
            break
        time.sleep(0.005)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    proc = torchrun(2, *train_cmd(killed, *layout))  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ("model", "model_ema"):
        ours, theirs = weights(killed, folder), weights(reference, folder)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{folder} {key}"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"]
                     for line in (reference / "metrics.jsonl").read_text().splitlines()]


def test_sharded_checkpoint_resumes_on_other_meshes(tmp_path, launched):
    """The step-5 checkpoint of a 4-process FSDP x TP run, resumed by 2 processes (FSDP only;
    in the 2-process launch, parallel_runs.resume_on_two) and by one: DCP reshards every
    tensor, and the runs end where the 4-process one did."""
    import shutil

    launch, layout, name = MESH_SOURCE
    source = launched(launch)[0] / layout / name
    out, _ = launched("two")
    assert "written by 4 process(es), with 2" in launched.stderr("two")
    assert "exact only up to them" in launched.stderr("two")
    alone = tmp_path / "on-1"
    shutil.copytree(source, alone, ignore=shutil.ignore_patterns("model", "model_ema"))
    shutil.rmtree(alone / "checkpoints" / "step-000000010")
    (alone / "checkpoints" / "latest").write_text("step-000000005\n")
    assert run(None, settings(name) + [f"out_dir={alone}"]).step == 10
    for nproc, other in ((2, out / "mesh-on-2"), (1, alone)):
        assert losses(other)[:5] == losses(source)[:5]  # kept from before the checkpoint
        torch.testing.assert_close(torch.tensor(losses(other)), torch.tensor(losses(source)),
                                   atol=1e-5, rtol=0)
        ours, theirs = weights(other), weights(source)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0,
                                       msg=f"{nproc} {key}")


def test_torchrun_masked_patch_prediction_follows_one_process(launched, tmp_path):
    # DDP with 2 processes: each draws the one-process run's masks for its half of every global
    # batch, and the head side the encoder does not use (GAP norm) gets no gradient in either.
    out, _ = launched("two")
    run(None, PRETRAIN_DDP + [f"out_dir={tmp_path / 'mpp'}"])
    want, have = losses(tmp_path / "mpp"), losses(out / "ddp-mpp")
    assert len(have) == len(want) == 6
    torch.testing.assert_close(torch.tensor(have), torch.tensor(want), atol=1e-5, rtol=0)
    theirs, ours = weights(tmp_path / "mpp"), weights(out / "ddp-mpp")
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=key)
    state = json.loads((out / "ddp-mpp" / "checkpoints" / "step-000000006" / "state.json")
                       .read_text())
    assert len(state["rng_per_process"]) == 2


# ------------------------------------------------------------------ settings refused
def test_parallel_settings_without_torchrun_are_one_line_errors(tmp_path, capsys):
    from vitscale.cli import main

    cases = [
        (["parallel.dp_shard=2"], "parallel.dp_replicate x dp_shard x tp = 1 x 2 x 1 = 2, but this "
                                  "process runs alone (no torchrun)"),
        (["parallel.tp=2", "parallel.dp_replicate=2"], "= 2 x 1 x 2 = 4"),
        (["parallel.activation_checkpointing=every:0"], "use none, full or every:K"),
        (["parallel.param_dtype=bfloat16"], "apply to FSDP"),
        (["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
    ]
    for overrides, message in cases:
        out = tmp_path / "run"
        assert main(["train", *runs()["vit-sgd"], *overrides, f"out_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not out.exists()


def test_sharded_settings_a_model_cannot_take_are_one_line_errors(launched):
    out, stdout = launched("two")  # the 2-process launch tries them after its runs
    lines = dict(line.removeprefix("refused ").split(": ", 1) for line in stdout.splitlines()
                 if line.startswith("refused "))
    for name, (_, words) in REFUSED.items():
        assert words in lines.get(name, ""), (name, lines.get(name))
        assert "\n" not in lines[name]
        assert not (out / "refused" / name).exists(), name


# ------------------------------------------------------------------ meta-device construction
def test_meta_init_on_a_fake_64_process_mesh():
    """ViT-22B/14 and g/14 sharded dp_shard 16 x tp 4 without allocating them: rank 0 holds
    exactly the analytic share of the parameters (about 1/64)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER.with_name("fake_mesh.py"))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["22B/14", "g/14"]
    for r in rows:
        assert r["total"] == r["counted"], r  # the formula covers every tensor of the model
        assert r["local"] == r["expected"], r
        # about 1/64: rank 0 also holds the whole position embedding (its dim 0 has size 1)
        assert 1 / 64 <= r["local"] / r["total"] < 1.05 / 64, r
    assert rows[0]["total"] > 21.7e9  # ViT-22B: 21.7B parameters, 87 GB in fp32, not allocated


# ------------------------------------------------------------------ checkpointing and compile
# As-ViT's stages of window-attention blocks (a tiny topology, 32 px).
BASE_ASVIT = [o for o in BASE if not o.startswith("model.")] + [
    "model.name=asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16", "data.img_size=32", "steps=3",
    "optim.name=adamw", "model.overrides.drop_path=0.1"]
def test_activation_checkpointing_changes_no_number(tmp_path):
    # Dropout and drop-path on: the recomputed forward must draw the same masks.
    noisy = ["steps=3", "model.overrides.drop_path=0.1", "model.overrides.dropout=0.1"]
    plans = {"vit": (runs()["vit-adamw"] + noisy, "full"),
             "vit22b": (runs()["vit22b-adafactor_bv"] + noisy + ["model.overrides.depth=4"], "every:2"),
             "asvit": (BASE_ASVIT, "full")}
    for name, (overrides, mode) in plans.items():
        plain = run(None, overrides + [f"out_dir={tmp_path / name / 'plain'}"])
        out = tmp_path / name / mode.replace(":", "")
        again = run(None, overrides + [f"out_dir={out}", f"parallel.activation_checkpointing={mode}"])
        assert again.metrics["test/loss"] == plain.metrics["test/loss"], (name, mode)
        ours, theirs = weights(out), weights(tmp_path / name / "plain")
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0,
                                       msg=f"{name} {mode} {key}")


def test_compiled_blocks_follow_eager(tmp_path):
    overrides = runs()["vit22b-adamw"] + ["steps=3", "model.overrides.depth=2"]
    run(None, overrides + [f"out_dir={tmp_path / 'eager'}"])
    run(None, overrides + [f"out_dir={tmp_path / 'compiled'}", "parallel.compile=true",
                           "parallel.activation_checkpointing=full"])
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "compiled")),
                               torch.tensor(losses(tmp_path / "eager")), atol=1e-5, rtol=0)
    ours, theirs = weights(tmp_path / "compiled"), weights(tmp_path / "eager")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=key)
