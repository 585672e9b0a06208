"""vitscale.plan: activations against what autograd saves, the planner's arithmetic, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from vitscale.cli import main
from vitscale.errors import ConfigError
from vitscale.models.counts import count
from vitscale.models.registry import build, model_config
from vitscale.parallel.blocks import transformer_blocks
from vitscale.parallel.checkpointing import apply_activation_checkpointing
from vitscale.plan import activation_bytes, parse_memory, plan
from vitscale.plan.measure import saved_bytes

# Ti and S (sequential blocks, class token) and ViT-22B's block (parallel, QK-norm, no
# biases, MAP head), small enough to run a forward of each in milliseconds.
SHAPES = {
    "Ti": ("Ti/4", {}),
    "S": ("S/4", {}),
    "vit22b": ("Ti/4", dict(block="parallel", qk_norm=True, qkv_bias=False, proj_bias=False,
                            mlp_bias=False, norm_bias=False, pool="map")),
}
KERNELS = ("math", "flash")


@pytest.mark.parametrize("shape", SHAPES)
def test_activations_are_what_autograd_saves(shape):
    name, overrides = SHAPES[shape]
    cfg = model_config(name, num_classes=10, img_size=32, depth=4, **overrides)
    x = torch.randn(4, 3, 32, 32)
    for every in (0, 1, 2):  # none, full, every:2
        torch.manual_seed(0)
        model = build(cfg).train()
        apply_activation_checkpointing(transformer_blocks(model), every)
        for precision in ("fp32", "bf16"):
            for kernel in KERNELS:
                got = saved_bytes(model, x, precision == "bf16", kernel)
                predicted = activation_bytes(cfg, 4, (32, 32), precision, kernel=kernel,
                                             every=every, device="cpu").saved
                assert abs(predicted / got - 1) < 0.10, (shape, every, precision, kernel,
                                                         predicted, got)


def test_max_batch_is_the_largest_that_fits():
    gap = model_config("L/16", num_classes=1000, pool="gap")  # 196 tokens: SP splits them
    for kwargs in (dict(), dict(act_ckpt="full", dp_shard=8, param_dtype="bfloat16"),
                   dict(tp=2, sequence_parallel=True, dp_shard=4, optim="adafactor_bv")):
        first = plan(gap, batch=8, device_memory="24GiB", **kwargs)
        assert first.max_batch > 8
        at = plan(gap, batch=first.max_batch, device_memory="24GiB", **kwargs)
        over = plan(gap, batch=first.max_batch + 1, device_memory="24GiB", **kwargs)
        assert at.fits and not over.fits, kwargs
        assert at.total_bytes <= 24 * 2**30 * 0.9 < over.total_bytes
        # the peak: at the start of backward (no gradients yet) here, activations held
        assert at.peak_at == "backward start"
        parts = (at.params_bytes + at.optimizer_bytes + at.fsdp_buffers_bytes
                 + at.comm_buffers_bytes + at.activations_bytes)
        assert abs(parts - at.total_bytes) <= 1
        kept = plan(gap, batch=first.max_batch, device_memory="24GiB", accum_steps=2, **kwargs)
        assert kept.total_bytes - at.total_bytes == at.grads_bytes  # accumulation keeps them


def test_flops_and_time_per_step():
    p = plan("B/16", batch=64, gpu="H100-SXM", mfu=0.5)
    assert p.flops_per_step == 3 * count(p_cfg := model_config("B/16", num_classes=1000)).flops * 64
    assert p_cfg.img_size == (224, 224)
    assert p.step_time_s == pytest.approx(p.flops_per_step / (989.4e12 * 0.5))
    # full checkpointing recomputes every block's forward once more: 4 forwards' worth
    ckpt = plan("B/16", batch=64, act_ckpt="full", tp=2)
    assert ckpt.flops_per_step == pytest.approx(p.flops_per_step * 4 / 3 / 2)


def test_sharding_divides_the_model_state():
    whole = plan("g/14", batch=1, optim="adam_bf16")
    sharded = plan("g/14", batch=1, optim="adam_bf16", dp_shard=8)
    assert whole.optimizer_bytes == 1.5 * whole.params_bytes == 6 * whole.params
    # rank 0 also holds the position embedding whole (its dim 0 has size 1): 0.25% more
    assert sharded.params_bytes == pytest.approx(whole.params_bytes / 8, rel=5e-3)
    assert sharded.fsdp_buffers_bytes > 0 and whole.fsdp_buffers_bytes == 0
    ddp = plan("g/14", batch=1, optim="adam_bf16", dp_replicate=8)
    assert ddp.comm_buffers_bytes == ddp.grads_bytes  # DDP's buckets


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("40 GB") == 40 * 10**9
    assert parse_memory("1.5TiB") == int(1.5 * 2**40)
    assert parse_memory(1024) == 1024
    for bad in ("lots", "80 parsecs", "-3GiB", "0GB", ""):
        with pytest.raises(ConfigError):
            parse_memory(bad)


def test_cli_json_and_one_line_errors(capsys):
    assert main(["plan", "B/16", "--batch", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "total_bytes", "fits", "max_batch"):
        assert key in doc
    assert doc["fits"] is True and doc["max_batch"] >= 64
    assert main(["plan", "B/16", "--dp-shard", "4", "--act-ckpt", "full"]) == 0
    out = capsys.readouterr().out
    assert "largest batch per device that fits" in out and "FSDP unsharded buffers" in out
    for argv, words in (
        (["plan", "Q/16"], "unknown model name"),
        (["plan", "B/16", "--tp", "5"], "not divisible by parallel.tp=5"),
        (["plan", "B/16", "--device-memory", "lots"], "is not a size"),
        (["plan", "B/16", "--act-ckpt", "every:0"], "every:K"),
        (["plan", "B/16", "--gpu", "TPUv9"], "unknown device"),
        (["plan", "B/16", "--batch", "0"], "at least 1"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (argv, err)


def test_table_gives_the_first_layout_that_fits(capsys):
    from vitscale.plan.table import _layouts, plan_table

    kwargs = dict(batch=32, optim="adafactor_bv", device_memory="80GiB")
    table = plan_table(["B/16", "22B/14"], devices=(1, 4, 256), **kwargs)
    assert table["B/16"][1] == "1" and table["B/16"][4] == "ddp"
    assert table["22B/14"][1] is None  # 22.2B fp32 weights alone are 89 GB
    label = table["22B/14"][256]
    assert label is not None
    earlier = []
    for name, layout in _layouts(256):
        if name == label:
            assert plan("22B/14", **layout, **kwargs).fits
            break
        earlier.append(layout)
    for layout in earlier:  # every layout with less machinery does not fit
        try:
            assert not plan("22B/14", **layout, **kwargs).fits, layout
        except ConfigError:
            pass
    assert main(["plan", "--table", "--batch", "32", "--optim", "adafactor_bv"]) == 0
    out = capsys.readouterr().out
    assert "22B/14" in out and "1024" in out


# detect-*.yaml are `vitscale detect` configs (DetectConfig), which the planner does not read
CONFIGS = sorted(p for p in (__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("detect-"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_fits_the_devices_it_states(path):
    from vitscale.plan.planner import plan_config, stated_devices

    stated = stated_devices(path)
    assert stated is not None or path.name == "demo.yaml", f"{path.name} states no device count"
    p = plan_config(path)
    assert p.fits, (path.name, p.total_bytes, p.device_memory)
    devices = stated[0] if stated else 1
    lay = p.layout
    assert lay["dp_replicate"] * lay["dp_shard"] * lay["tp"] == devices


def test_plan_config_runs_the_config_as_trained(tmp_path, capsys):
    from vitscale.plan.planner import plan_config

    config = tmp_path / "run.yaml"
    config.write_text("# vitscale plan: 16 devices x 40GB\nmodel: {name: L/16}\n"
                      "data: {batch_size: 1024, img_size: 224}\naccum_steps: 2\nprecision: bf16\n"
                      "optim: {name: adafactor_bv}\n"
                      "parallel: {dp_shard: 4, activation_checkpointing: every:2}\n")
    p = plan_config(config)
    assert p.batch == 1024 // 16 // 2 and p.device_memory == 40 * 10**9
    assert p.layout["dp_replicate"] == 4 and p.layout["dp_shard"] == 4
    assert (p.optimizer, p.act_ckpt, p.precision) == ("adafactor_bv", "every:2", "bf16")
    same = plan("L/16", batch=32, precision="bf16", optim="adafactor_bv", dp_shard=4,
                dp_replicate=4, act_ckpt="every:2", device_memory="40GB", num_classes=10,
                accum_steps=2)
    assert same.total_bytes == p.total_bytes
    assert main(["plan", "--config", str(config), "--devices", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 64
    assert main(["plan", "--config", str(config), "--devices", "6"]) == 2
    assert "dp_shard x tp" in capsys.readouterr().err


def test_models_without_a_closed_form_are_measured():
    from vitscale.models.registry import any_config
    from vitscale.plan.measure import measured_activations

    cfg = any_config("asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16", img_size=32, num_classes=10)
    torch.manual_seed(0)
    model = build(cfg).train()
    for every in (0, 1):
        if every:
            apply_activation_checkpointing(transformer_blocks(model), every)
        got = saved_bytes(model, torch.zeros(5, 3, 32, 32), False, "flash")
        assert measured_activations(cfg, 5, "fp32", "flash", every).saved == got
    p = plan(cfg, batch=8, act_ckpt="full")
    assert p.activations_bytes == pytest.approx(
        measured_activations(cfg, 8, "bf16", "flash", 1).peak, abs=1)
    hybrid = plan("R26+S/32", img_size=64, batch=8, act_ckpt="full")
    assert 0 < hybrid.activations_bytes < plan("R26+S/32", img_size=64, batch=8).activations_bytes


def test_a_checkpoint_is_planned_from_its_config(tmp_path):
    from vitscale.models import save

    cfg = model_config("S/16", num_classes=37, img_size=96, pool="gap")
    save(build(cfg), tmp_path / "run" / "model")
    for where in (tmp_path / "run", tmp_path / "run" / "model"):  # a run directory or its model
        p = plan(str(where), batch=4)
        assert p.total_bytes == plan(cfg, batch=4).total_bytes and p.img_size == [96, 96]
