"""`vitscale train` end to end on digits: run directory, metrics, exact resume after SIGKILL,
non-finite losses, gradient accumulation, and one-line config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitscale.cli import main
from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.train import Trainer, TrainingError, run
from vitscale.train.checkpoint import latest_checkpoint
from vitscale.train.loop import restore_determinism

# A model small enough for a CPU test: 16 px digits in 4x4 patches (16 tokens + class token).
TINY = [
    "model.name=Ti/4", "model.overrides.width=64", "model.overrides.depth=2",
    "model.overrides.heads=4", "model.overrides.mlp_dim=128", "model.overrides.dropout=0.1",
    "model.overrides.posemb=sincos2d", "model.overrides.pool=gap",
    "data.img_size=16", "data.batch_size=32", "data.augment=light1", "data.flip=false",
    "data.crop_scale_min=0.6", "data.mixup_alpha=0.2",
    "optim.lr=0.003", "schedule.warmup_steps=2", "progress=false", "log_every=2",
]


def tiny(tmp: Path, *extra: str):
    return load_config(None, TINY + [f"out_dir={tmp}", *extra])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_metrics_and_learning(tmp_path):
    result = run(tiny(tmp_path, "steps=100", "eval_every=50", "ckpt_every=50", "ema_decay=0.9",
                      "data.augment=none", "data.mixup_alpha=0.0", "model.overrides.dropout=0.0",
                      "optim.lr=0.002"))
    assert (tmp_path / "config.yaml").is_file()
    assert load_config(tmp_path / "config.yaml").steps == 100  # the resolved config reloads
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(tmp_path).name == "step-000000100"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model_ema" / "model.safetensors").is_file()
    rows = records(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(2, 101, 2))
    for key in ("epoch", "images_seen", "lr", "loss", "accuracy", "images_per_s"):
        assert key in train_rows[0], key
    assert train_rows[-1]["accuracy"] > train_rows[0]["accuracy"]  # on the training batches
    assert train_rows[-1]["images_seen"] == 100 * 32
    evals = [r for r in rows if r.get("split") == "minival"]
    assert [r["step"] for r in evals] == [50, 100]
    assert {"minival/accuracy", "ema/minival/accuracy", "epoch", "images_seen"} <= set(evals[0])
    final = rows[-1]
    assert final["split"] == "test" and "ema/test/accuracy" in final
    assert final["best/minival/accuracy"] == max(r["minival/accuracy"] for r in evals)
    # 100 steps (2.5 epochs) of a tiny ViT already beat chance (0.1) on 10 digits by far.
    assert result.metrics["test/accuracy"] > 0.35
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("device", [
    "device=cpu",
    # CUDA kernels are bitwise reproducible only with deterministic=true (atomics otherwise).
    pytest.param("device=cuda deterministic=true", marks=pytest.mark.gpu),
])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, device):
    args = ["steps=30", "ckpt_every=5", "eval_every=15", "ema_decay=0.9",
            "data.batch_size=64", "model.overrides.drop_path=0.1", *device.split()]
    reference = tmp_path / "reference"
    run(tiny(reference, *args))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vitscale.cli", "train", *TINY, *args, f"out_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    stopped_at = int(latest_checkpoint(killed).name.split("-")[1])
    assert 0 < stopped_at < 30

    # Resume by running the same command again: the run directory's latest checkpoint is used.
    assert main(["train", *TINY, *args, f"out_dir={killed}"]) == 0
    ours, theirs = _final_weights(killed), _final_weights(reference)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    ema_a = load_file(str(killed / "model_ema" / "model.safetensors"))
    ema_b = load_file(str(reference / "model_ema" / "model.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_b)
    # metrics.jsonl has each step once, as the uninterrupted run's.
    steps = [r["step"] for r in records(killed) if "loss" in r]
    assert steps == [r["step"] for r in records(reference) if "loss" in r]
    assert records(killed)[-1]["test/accuracy"] == records(reference)[-1]["test/accuracy"]


def _nan_on_call(monkeypatch, bad_call: int):
    import vitscale.objectives.supervised as supervised
    import vitscale.train.loop as loop

    real = loop.loss_fn
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == bad_call else loss

    for module in (loop, supervised):  # the evaluation's and the training objective's
        monkeypatch.setattr(module, "loss_fn", flaky)


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    _nan_on_call(monkeypatch, bad_call=5)  # the 5th optimizer step is step index 4
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 4;"):
        run(tiny(tmp_path, "steps=8", "ckpt_every=2"))
    # Checkpoints written before the failure hold finite weights; none after it.
    assert latest_checkpoint(tmp_path).name == "step-000000004"
    weights = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_loss_skip_mode(tmp_path, monkeypatch, capsys):
    _nan_on_call(monkeypatch, bad_call=3)
    # One skip in 8 steps is within max_skipped_fraction=0.2 (1 <= 1.6).
    result = run(tiny(tmp_path, "steps=8", "on_nonfinite=skip", "max_skipped_fraction=0.2"))
    assert result.step == 8
    assert [r for r in records(tmp_path) if "loss" in r][-1]["skipped_steps"] == 1
    weights = _final_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "skipped 1 of 8 steps (non-finite loss or gradient)" in capsys.readouterr().out


def test_too_many_skipped_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    import vitscale.objectives.supervised as supervised
    import vitscale.train.loop as loop

    real = loop.loss_fn
    calls = {"n": 0}

    def mostly_nan(*args, **kwargs):  # every training step from the 3rd on is non-finite
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 and loss.requires_grad else loss

    for module in (loop, supervised):  # the evaluation's and the training objective's
        monkeypatch.setattr(module, "loss_fn", mostly_nan)
    # The default max_skipped_fraction=0.1 of 12 steps allows 1 skip: the 2nd (step 3) stops it.
    code = main(["train", *TINY, f"out_dir={tmp_path}", "steps=12", "on_nonfinite=skip"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "2 of the first 4 steps had a non-finite loss or gradient" in err
    assert "max_skipped_fraction=0.1 of 12 steps" in err
    assert not (tmp_path / "model").exists()  # no model whose test loss is NaN


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Without dropout, 4 micro-batches of 8 give the update of one batch of 32 (up to float
    # summation order; SGD, since Adam would blow up the rounding noise of zero-gradient
    # parameters such as the key bias into full-size steps).
    common = ["steps=3", "model.overrides.dropout=0.0", "optim.name=sgd", "optim.lr=0.1",
              "optim.grad_clip=null", "label_smoothing=0.1"]
    a = Trainer(tiny(tmp_path / "a", *common))
    b = Trainer(tiny(tmp_path / "b", *common, "accum_steps=4"))
    a.fit(), b.fit()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_unreadable_latest_checkpoint_resumes_from_the_one_before_exactly(tmp_path, capsys):
    args = ["steps=20", "ckpt_every=5", "keep_checkpoints=4", "model.overrides.drop_path=0.1"]
    run(tiny(tmp_path, *args))
    reference = _final_weights(tmp_path)
    root = tmp_path / "checkpoints"
    bad = root / "step-000000020" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])  # torn by a full disk, say
    assert main(["train", *TINY, *args, f"out_dir={tmp_path}"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "step-000000020" in warning[0] and "model.safetensors" in warning[0]
    assert "resuming from step-000000015" in warning[0]
    assert (root / "unreadable-step-000000020" / "model.safetensors").stat().st_size == 1000
    ours = _final_weights(tmp_path)  # steps 15..20 redone: the same weights, bit for bit
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_sigmoid_loss_bf16_and_adafactor_run(tmp_path):
    result = run(tiny(tmp_path, "steps=6", "loss=sigmoid", "precision=bf16",
                      "optim.name=adafactor_bv", "schedule.decay=rsqrt",
                      "schedule.cooldown_steps=2", "model.overrides.pool=map",
                      "model.overrides.head_bias_init=-2.0"))
    assert all(torch.isfinite(v).all() for v in _final_weights(tmp_path).values())
    # The loop's numbers, recomputed from the saved weights: accuracy on test and the run's own
    # loss (sigmoid: summed over classes, no smoothing) on minival, not softmax cross-entropy.
    from vitscale.data import build_data
    from vitscale.models import load

    cfg = load_config(tmp_path / "config.yaml")
    model, data = load(tmp_path / "model").eval(), build_data(cfg.data, cfg.seed)

    def logits_of(split):
        xs, ys = zip(*data.eval_loader(split))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.cat(xs)).float(), torch.cat(ys)

    logits, labels = logits_of("test")
    assert result.metrics["test/accuracy"] == pytest.approx(
        (logits.argmax(-1) == labels).double().mean().item())
    logits, labels = logits_of("minival")
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    sigmoid = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, onehot, reduction="none").sum(-1).mean().item()
    softmax = torch.nn.functional.cross_entropy(logits, labels).item()
    minival = [r for r in records(tmp_path) if r.get("split") == "minival"][-1]
    assert minival["minival/loss"] == pytest.approx(sigmoid, rel=1e-5)
    assert abs(sigmoid - softmax) > 0.1  # the two losses are told apart here


def test_loss_fn_against_closed_forms():
    from vitscale.train import loss_fn

    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[0.0, 1.0, 0.0]])
    soft = torch.tensor([[0.05, 0.9, 0.05]])  # label smoothing 0.15 over 3 classes
    log_p = logits.log_softmax(-1)
    assert loss_fn(logits, target, "softmax", 0.15).item() == pytest.approx(
        -(soft * log_p).sum().item(), rel=1e-6)
    sig = torch.sigmoid(logits)
    expected = -(target * sig.log() + (1 - target) * (1 - sig).log()).sum()
    assert loss_fn(logits, target, "sigmoid", 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.img_size=30", "data.img_size=30"),
    ("data.batch_size=30", "data.batch_size=30 must be divisible by accum_steps=4"),
    ("optim.name=lamb", "optim.name='lamb' is not valid; choose one of adamw, adam_bf16"),
    ("schedule.decay=exp", "schedule.decay='exp' is not valid; choose one of cosine"),
    ("data.augment=heavy", "data.augment='heavy' is not valid; choose one of none, light1"),
    ("log_every=0", "log_every=0 must be >= 1"),
    ("steps=-5", "steps=-5 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("eval_every=0", "eval_every=0 must be >= 1"),
    ("ckpt_every=0", "ckpt_every=0 must be >= 1"),
    ("keep_checkpoints=0", "keep_checkpoints=0 must be >= 1"),
    ("accum_steps=0", "accum_steps=0 must be >= 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 must be >= 1"),
    ("data.minival_fraction=1.5", "data.minival_fraction=1.5 must be in [0, 1)"),
    ("data.max_skip_fraction=2", "data.max_skip_fraction=2.0 must be in [0, 1]"),
    ("data.crop_scale_min=0", "data.crop_scale_min=0.0 must be in (0, 1]"),
    ("schedule.warmup_fraction=1.2", "schedule.warmup_fraction=1.2 must be in [0, 1]"),
    ("optim.betas=[0.9,1.0]", "optim.betas=(0.9, 1.0) must be in [0, 1)"),
    ("optim.lr_mults={head: -2}", "optim.lr_mults={'head': -2.0} must be >= 0"),
    ("max_skipped_fraction=-0.1", "max_skipped_fraction=-0.1 must be in [0, 1]"),
    ("evals.fewshot.shots=[0,5]", "evals.fewshot.shots=[0, 5] must be >= 1"),
    ("model.overrides.norm_eps=tiny", "model.overrides.norm_eps: expected a number, got 'tiny'"),
    ("model.overrides.heads=[1", "model.overrides.heads: expected an integer, got '[1'"),
    ("model.overrides.layers=2", "model.overrides.layers: not a setting of 'Ti/4'"),
])
def test_bad_configs_are_one_line_errors(tmp_path, capsys, override, message):
    extra = ["accum_steps=4"] if "accum_steps=4" in message else []
    code = main(["train", *TINY, f"out_dir={tmp_path / 'run'}", *extra, override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_config_choices_are_what_the_packages_build():
    # A choice accepted at config time is one the data / optimizer / schedule code builds.
    import typing

    from vitscale.config import AugRegPreset, OptimConfig, ScheduleConfig
    from vitscale.data.transforms import AUGREG_PRESETS
    from vitscale.models import create_model
    from vitscale.optim import build_optimizer, schedule_value

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert typing.get_args(AugRegPreset) == tuple(AUGREG_PRESETS)
    model = create_model("Ti/16", img_size=16, patch=8, depth=1, num_classes=2)
    kinds = {type(build_optimizer(model, OptimConfig(name=n))).__name__
             for n in choices(OptimConfig, "name")}
    assert kinds == {"AdamW", "AdamBF16", "AdafactorBV", "SGD"}
    ends = {d: schedule_value(90, 100, ScheduleConfig(decay=d)) for d in choices(ScheduleConfig, "decay")}
    assert len(set(ends.values())) == len(ends)  # four different curves, none silently the same


def test_model_overrides_are_typed_at_config_time():
    # YAML 1.1 reads 1e-5 as a string; it reaches the model as the float it is.
    cfg = load_config(None, [*TINY, "model.overrides.norm_eps=1e-5"])
    assert cfg.model.overrides["norm_eps"] == 1e-5
    model = cfg.model.build_config(10, 16)
    assert model.norm_eps == 1e-5
    asvit = load_config(None, ["model.name=asvit-seed", "data.img_size=32",
                               "model.overrides.depths=[1,2,1,1]"])
    assert asvit.model.overrides["depths"] == (1, 2, 1, 1)
    with pytest.raises(ConfigError, match="model.overrides.pool: not a setting of 'asvit-seed'"):
        load_config(None, ["model.name=asvit-seed", "model.overrides.pool=gap"])


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-4 as a string; a float setting takes it as the number it is.
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, ["optim.lr=3E-2"]).optim.lr == 0.03


def test_deterministic_switch_is_undone_after_the_run(tmp_path):
    # torch's switch is process-global; a deterministic run must not leave it on for the next.
    assert not torch.are_deterministic_algorithms_enabled()
    trainer = Trainer(tiny(tmp_path / "a", "steps=2", "deterministic=true", "device=cpu"))
    assert torch.are_deterministic_algorithms_enabled() and trainer.determinism_before == (False, False)
    run(tiny(tmp_path / "b", "steps=2", "deterministic=true", "device=cpu"))
    assert torch.are_deterministic_algorithms_enabled()  # the first trainer never ran: still on
    restore_determinism(trainer.determinism_before)
    assert not torch.are_deterministic_algorithms_enabled()


def test_missing_config_file_and_resume_folder(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", *TINY, f"out_dir={tmp_path}", "--resume", str(tmp_path)]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_shipped_configs_load(tmp_path):
    from vitscale.config import DetectConfig, TrainConfig

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        cls = DetectConfig if path.name.startswith("detect") else TrainConfig  # vitscale detect's
        cfg = load_config(path, cls=cls)  # a sharded recipe too: its mesh is checked when training starts
        assert cfg.optim.lr > 0, path
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.name=S/16"])


def test_two_process_data_parallel_equals_one_process(tmp_path):
    # torchrun with 2 CPU processes (gloo): each loads half of every global batch of 32 and DDP
    # averages the gradients, so the run follows the single-process one. Without dropout and
    # Mixup (which pairs examples within a process's half) the two agree up to float rounding.
    args = ["steps=6", "ckpt_every=3", "model.overrides.dropout=0.0", "data.mixup_alpha=0.0",
            "optim.name=sgd", "optim.lr=0.1", "accum_steps=2", "device=cpu"]
    single = tmp_path / "single"
    ref = run(tiny(single, *args))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitscale.cli", "train", *TINY, *args, f"out_dir={ddp}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy:") == 1  # rank 0 reports
    ours, theirs = _final_weights(ddp), _final_weights(single)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)
    final = records(ddp)[-1]
    assert final["test/accuracy"] == pytest.approx(ref.metrics["test/accuracy"], abs=1 / 360)
    state = json.loads((latest_checkpoint(ddp) / "state.json").read_text())
    assert len(state["rng_per_process"]) == 2
    # That the global batch must split evenly over the processes and micro-batches is checked
    # in tests/test_parallel.py's 2-process launch (REFUSED["batch"] in tests/parallel_runs.py).


def test_periodic_fewshot_evaluator(tmp_path):
    run(tiny(tmp_path, "steps=20", "evals.fewshot.every=10", "evals.fewshot.shots=[1,5]",
             "evals.fewshot.seeds=2"))
    rows = [r for r in records(tmp_path) if r.get("split") == "fewshot"]
    assert [r["step"] for r in rows] == [10, 20]
    assert all("images_seen" in r for r in rows)
    # The last row is the final weights: the standalone evaluator on the saved model must give
    # the same accuracies, mean and spread over the draws.
    from vitscale.data import build_data
    from vitscale.eval import fewshot_model
    from vitscale.models import load

    cfg = load_config(tmp_path / "config.yaml")
    alone = fewshot_model(load(tmp_path / "model"), build_data(cfg.data, cfg.seed), [1, 5], 2)
    for r in alone["results"]:
        assert rows[-1][f"fewshot/{r['shots']}shot"] == pytest.approx(r["mean"], abs=1e-9)
        assert rows[-1][f"fewshot/{r['shots']}shot_std"] == pytest.approx(r["std"], abs=1e-9)
    assert rows[0]["fewshot/5shot"] != rows[-1]["fewshot/5shot"]  # the weights moved in between
    with pytest.raises(ConfigError, match=r"evals.fewshot.shots\[1\]: expected an integer"):
        tiny(tmp_path, "evals.fewshot.shots=[1,x]")
