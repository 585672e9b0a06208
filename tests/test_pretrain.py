"""Self-supervised pre-training: the ViT paper's masked patch prediction (mpp) and MAE.

References are independent: the corruption statistics are counted over 10^5 tokens, the colour
targets computed with numpy, the MAE token count read off the first block, FLOPs from torch's
counter; training runs are ordinary vitscale runs that the evaluators and fine-tuning read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.cli import main
from vitscale.config import MAEConfig, MPPConfig, load_config
from vitscale.errors import ConfigError, DataError
from vitscale.models.registry import any_config, build
from vitscale.objectives import MaskedAutoencoder, MaskedPatchPrediction
from vitscale.objectives.mpp import KEPT, MASKED, SWAPPED, UNCHANGED, corrupt, corruption_plan
from vitscale.objectives.pretrain import color_classes, patchify
from vitscale.train import run

# 16 px digits in 4x4 patches: 16 tokens (+ a class token where asked).
TINY = [
    "model.name=Ti/4", "model.overrides.width=32", "model.overrides.depth=2",
    "model.overrides.heads=2", "model.overrides.mlp_dim=64", "model.overrides.pool=gap",
    "model.overrides.posemb=sincos2d", "data.img_size=16", "data.batch_size=32",
    "data.augment=none", "data.crop_scale_min=0.6", "progress=false", "log_every=5",
    "mae.decoder_width=32", "mae.decoder_depth=1", "mae.decoder_heads=2", "device=cpu",
]


def tiny_model(**overrides):
    settings = dict(num_classes=0, img_size=16, width=32, depth=1, heads=2, mlp_dim=64,
                    pool="gap", posemb="sincos2d")
    settings.update(overrides)
    return build(any_config("Ti/4", **settings))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- MPP masks
def test_corruption_statistics_over_1e5_tokens():
    cfg = MPPConfig()
    plan = corruption_plan(1000, 100, cfg, torch.Generator().manual_seed(3))  # 10^5 tokens
    fate, source = plan[..., 0], plan[..., 1]
    share = {k: (fate == k).double().mean().item() for k in (UNCHANGED, MASKED, SWAPPED, KEPT)}
    assert share[UNCHANGED] == 0.5  # exactly half of each image's patches are selected
    assert share[MASKED] == pytest.approx(0.40, abs=0.01)
    assert share[SWAPPED] == pytest.approx(0.05, abs=0.01)
    assert share[KEPT] == pytest.approx(0.05, abs=0.01)
    positions = torch.arange(100).expand(1000, -1)
    swapped = fate == SWAPPED
    assert not (source[swapped] == positions[swapped]).any()  # never the patch itself
    assert ((source >= 0) & (source < 100)).all()  # a patch of the same image
    assert (source[~swapped] == positions[~swapped]).all()
    # Every other patch is a possible source (no bias towards neighbours).
    offsets = ((source - positions) % 100)[swapped]
    assert offsets.min() == 1 and offsets.max() == 99
    # The same seed gives the same plan; another step another one.
    again = corruption_plan(1000, 100, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(plan, again)
    other = corruption_plan(1000, 100, cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(plan, other)


def test_corrupt_replaces_embeddings_as_planned():
    gen = torch.Generator().manual_seed(0)
    plan = corruption_plan(4, 16, MPPConfig(mask_fraction=0.4, random_fraction=0.4), gen)
    embeddings = torch.randn(4, 16, 8, generator=gen)
    mask = torch.randn(1, 1, 8, generator=gen)
    out = corrupt(embeddings, plan, mask)
    for b in range(4):
        for j in range(16):
            fate, src = plan[b, j].tolist()
            expected = {MASKED: mask[0, 0], SWAPPED: embeddings[b, src]}.get(fate, embeddings[b, j])
            assert torch.equal(out[b, j], expected), (b, j, fate)


def test_masks_follow_the_step_and_the_data_parallel_slice():
    model = tiny_model()
    whole = MaskedPatchPrediction(MPPConfig(), model, seed=5, batch_size=8)
    halves = [MaskedPatchPrediction(MPPConfig(), model, seed=5, batch_size=8, shard=s, rank=r)
              for r, s in enumerate((slice(0, 4), slice(4, 8)))]
    x = torch.zeros(8, 3, 16, 16)
    plan = whole.prepare(x, None, None, 1.0, step=7)
    assert torch.equal(plan, whole.prepare(x, None, None, 1.0, step=7))  # resume draws the same
    assert not torch.equal(plan, whole.prepare(x, None, None, 1.0, step=8))
    # Two data-parallel processes draw the one-process run's masks, each its half.
    parts = [h.prepare(x[:4], None, None, 1.0, step=7) for h in halves]
    assert torch.equal(torch.cat(parts), plan)


# ---------------------------------------------------------------------------------- targets
def _as_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> the data pipeline's float [-1, 1] (B, 3, H, W)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _numpy_colour_classes(pixels: np.ndarray, patch: int, side: int) -> np.ndarray:
    b, h, w, _ = pixels.shape
    cell = patch // side
    out = np.zeros((b, (h // patch) * (w // patch), side * side), dtype=np.int64)
    for i in range(b):
        for gy in range(h // patch):
            for gx in range(w // patch):
                for cy in range(side):
                    for cx in range(side):
                        y0, x0 = gy * patch + cy * cell, gx * patch + cx * cell
                        mean = pixels[i, y0:y0 + cell, x0:x0 + cell].reshape(-1, 3).mean(0)
                        r, g, bl = np.minimum((mean // 32).astype(int), 7)
                        out[i, gy * (w // patch) + gx, cy * side + cx] = r * 64 + g * 8 + bl
    return out


def test_3bit_targets_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    # Known colours: every 8x8 patch one flat colour, so the class is the colour's levels.
    colours = rng.integers(0, 256, size=(2, 2, 2, 3), dtype=np.uint8)
    flat = np.kron(colours, np.ones((1, 8, 8, 1), dtype=np.uint8))  # (2, 16, 16, 3)
    got = color_classes(_as_model_input(flat), (8, 8), 1)[..., 0]
    levels = colours.reshape(2, 4, 3).astype(int) // 32
    assert torch.equal(got, torch.from_numpy(levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]))
    # Any pixels: the mean colour per patch, and the 4x4 downsized patch, as numpy computes them.
    noisy = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    for side in (1, 4):
        got = color_classes(_as_model_input(noisy), (8, 8), side)
        assert torch.equal(got, torch.from_numpy(_numpy_colour_classes(noisy, 8, side))), side
    # White is the top class, black the bottom one.
    extremes = np.stack([np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    assert color_classes(_as_model_input(extremes), (8, 8), 1).flatten().tolist() == [511, 0]


def test_patchify_matches_the_patch_embedding_order():
    x = torch.randn(2, 3, 16, 16)
    patches = patchify(x, (4, 4))
    assert patches.shape == (2, 16, 48)
    # Patch (row 1, column 2) is token 1 * 4 + 2, its values in (row, column, channel) order.
    assert torch.equal(patches[1, 6], x[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("target, outputs", [("mean3bit", 512), ("patch4x4_3bit", 16 * 512),
                                             ("l2", 4 * 4 * 3)])
def test_mpp_head_and_loss_per_target(target, outputs):
    torch.manual_seed(0)
    model = tiny_model()
    objective = MaskedPatchPrediction(MPPConfig(target=target), model, batch_size=4)
    assert objective.trainable().head.out_features == outputs
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    plan = objective.prepare(x, None, None, 1.0, step=0)
    loss, correct, count = objective.loss(model, x, None, plan)
    assert torch.isfinite(loss)
    selected = 4 * 8  # half of 16 patches per image
    assert count == {"mean3bit": selected, "patch4x4_3bit": selected * 16, "l2": 0}[target]
    if target != "l2":  # a random head is near chance: log(512) nats
        assert loss.item() == pytest.approx(np.log(512), rel=0.3)
    loss.backward()
    assert objective.trainable().mask_token.grad.abs().sum() > 0  # the [mask] embedding learns
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- MAE
def test_mae_encoder_sees_only_the_kept_tokens_and_costs_less():
    torch.manual_seed(0)
    model = tiny_model(img_size=32, class_token=True, depth=2)  # 64 patches + a class token
    mae = MaskedAutoencoder(MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2), model,
                            batch_size=2)
    mpp = MaskedPatchPrediction(MPPConfig(), model, batch_size=2)
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    x = torch.randn(2, 3, 32, 32)
    loss, _, _ = mae.loss(model, x, None, mae.prepare(x, None, None, 1.0, 0))
    hook.remove()
    assert seen == [torch.Size([2, 1 + 16, 32])]  # 25% of 64 patches, and the class token
    assert torch.isfinite(loss)

    def encoder_flops(plan_to_kwargs, objective) -> int:
        plan = objective.prepare(x, None, None, 1.0, 0)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, outputs="tokens", **plan_to_kwargs(objective, plan)).sum().backward()
        return counter.get_total_flops()

    mae_flops = encoder_flops(lambda o, p: {"keep": p[:, :o.keep]}, mae)
    mpp_flops = encoder_flops(lambda o, p: {"patch_hook": lambda e: corrupt(
        e, p, o.trainable().mask_token)}, mpp)
    # Forward + backward of the encoder per step: 17 of 65 tokens (attention falls quadratically).
    assert mae_flops <= 0.4 * mpp_flops
    assert mae_flops / mpp_flops == pytest.approx(17 / 65, abs=0.05)


def test_mae_reconstructs_a_constant_image():
    # Each image one random colour: the hidden patches' pixels are the visible ones' colour,
    # which the decoder has to carry over; predicting any fixed value scores the variance, 1/3.
    torch.manual_seed(0)
    model = tiny_model()
    mae = MaskedAutoencoder(MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2,
                                      norm_pix_loss=False), model, batch_size=16)
    opt = torch.optim.Adam([*model.parameters(), *mae.trainable().parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(300):
        x = (torch.rand(16, 3, 1, 1, generator=gen) * 2 - 1).expand(16, 3, 16, 16)
        loss, _, _ = mae.loss(model, x, None, mae.prepare(x, None, None, 1.0, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.3
    assert np.mean(losses[-10:]) < 0.01  # under 3% of the variance


def test_mae_normalised_pixel_target():
    model = tiny_model()
    mae = MaskedAutoencoder(MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2), model)
    x = torch.randn(2, 3, 16, 16)
    target = mae.target(x)
    raw = patchify(x, (4, 4))
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(target, expected)
    assert target.mean(-1).abs().max() < 1e-5


# ---------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def mpp_run(tmp_path_factory):
    """A short MPP run on digits (labels never read), checkpointed every 10 steps."""
    out = tmp_path_factory.mktemp("mpp-run")
    result = run(load_config(None, TINY + ["objective=mpp", "steps=20", "eval_every=10",
                                           "ckpt_every=10", f"out_dir={out}"]))
    return out, result


def test_mpp_run_logs_its_loss_and_accuracy_and_is_an_encoder(mpp_run):
    out, result = mpp_run
    rows = records(out)
    train = [r for r in rows if "loss" in r]
    assert {"loss", "accuracy", "train_flops"} <= set(train[0])
    assert 0 <= train[-1]["accuracy"] <= 1
    minival = [r for r in rows if r.get("split") == "minival"]
    assert {"minival/loss", "minival/accuracy"} <= set(minival[0])
    assert rows[-1]["split"] == "test" and "test/accuracy" in rows[-1]
    assert minival[-1]["minival/loss"] < minival[0]["minival/loss"] + 0.5  # sane, not diverging
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert not any(k.startswith(("head.", "objective.")) for k in weights)  # an encoder only
    ckpt = load_file(str(out / "checkpoints" / "step-000000020" / "model.safetensors"))
    assert {"objective.mask_token", "objective.head.weight"} <= set(ckpt)


def test_mpp_resume_is_exact(mpp_run, tmp_path):
    out, _ = mpp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-000000020")
    (resumed / "checkpoints" / "latest").write_text("step-000000010\n")
    run(load_config(None, TINY + ["objective=mpp", "steps=20", "eval_every=10", "ckpt_every=10",
                                  f"out_dir={resumed}"]))
    ours = load_file(str(resumed / "model" / "model.safetensors"))
    theirs = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert records(resumed)[-1]["test/loss"] == records(out)[-1]["test/loss"]


def test_pretrained_run_is_read_by_finetune_fewshot_and_model_init(mpp_run, tmp_path, capsys):
    from vitscale.eval.api import fewshot_checkpoint
    from vitscale.train import finetune

    out, _ = mpp_run
    encoder = load_file(str(out / "model" / "model.safetensors"))
    result = finetune(out, "digits", overrides=["steps=4", "progress=false", "eval_every=4",
                                                "data.batch_size=32", f"out_dir={tmp_path / 'ft'}"])
    assert "was pre-trained with objective=mpp" in capsys.readouterr().err
    assert 0 <= result.metrics["test/accuracy"] <= 1
    ft_cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert ft_cfg.model.init == str(out / "model")
    few = fewshot_checkpoint(out, "digits", shots=[2], seeds=1)
    assert 0 < few["results"][0]["mean"] <= 1
    # model.init=RUN: the encoder's weights, and a new head for the 10 classes.
    cfg = load_config(None, TINY + [f"model.init={out}", "steps=1", f"out_dir={tmp_path / 'init'}"])
    from vitscale.train.loop import build_model

    model = build_model(cfg, 10)
    assert model.cfg.num_classes == 10
    assert torch.equal(model.patch_embed.proj.weight, encoder["patch_embed.proj.weight"])


def test_short_mpp_pretraining_beats_random_features_at_10_shots(tmp_path):
    # benchmarks/pretrain.py's claim in small: an encoder pre-trained on the digits train split
    # without labels gives better frozen features than its random initialisation. 400 steps of
    # the paper's L2 target (on grey digits the 3-bit mean colour has 8 values, mostly black, and
    # needs about twice the steps); seeds 0-2 measured +5.0 / +4.7 / +6.6 points.
    from vitscale.data import build_data
    from vitscale.eval.api import fewshot_checkpoint, fewshot_model
    from vitscale.train.loop import build_model

    cfg = load_config(None, TINY + [
        "objective=mpp", "mpp.target=l2", "model.overrides.width=64", "model.overrides.heads=4",
        "model.overrides.mlp_dim=128", "data.batch_size=64", "optim.lr=0.001",
        "optim.weight_decay=0.05", "schedule.warmup_fraction=0.05", "steps=400",
        "eval_every=400", "log_every=100", f"out_dir={tmp_path / 'mpp'}"])
    result = run(cfg)
    pretrained = fewshot_checkpoint(result.run_dir, "digits", shots=[10], seeds=3)
    torch.manual_seed(cfg.seed)
    random_init = fewshot_model(build_model(cfg, 0), build_data(cfg.data, cfg.seed), [10], seeds=3)
    gain = pretrained["results"][0]["mean"] - random_init["results"][0]["mean"]
    assert gain > 0.02, gain


def test_mae_trains_on_a_flat_image_folder(tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    source = f"data.source=imagefolder:{folder}"
    out = tmp_path / "mae"
    assert main(["pretrain", "--objective", "mae", *TINY, source, "data.batch_size=8",
                 "data.minival_fraction=0.2", "steps=6", "eval_every=3", f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "no test split: the mae loss on minival" in printed and "accuracy" not in printed
    assert load_config(out / "config.yaml").objective == "mae"
    rows = records(out)
    assert "accuracy" not in [r for r in rows if "loss" in r][0]  # MAE has a loss only
    assert "minival/loss" in [r for r in rows if r.get("split") == "minival"][0]
    # MAE's step FLOPs are measured: encoder on 4 of 16 patches plus the decoder.
    full = [r for r in rows if "loss" in r][0]["train_flops"]
    assert 0 < full
    # Supervised training on unlabelled images: one line naming the fix.
    code = main(["train", *TINY, source, "steps=2", f"out_dir={tmp_path / 'sup'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "has no labels" in err and "objective=mpp" in err
    assert not (tmp_path / "sup").exists()


@pytest.mark.parametrize("override, message", [
    (["mpp.corrupt_rate=0"], "mpp.corrupt_rate=0.0 must be in (0, 1)"),
    (["mpp.corrupt_rate=1.5"], "mpp.corrupt_rate=1.5 must be in (0, 1)"),
    (["objective=mae", "mae.mask_ratio=1"], "mae.mask_ratio=1.0 must be in (0, 1)"),
    (["mpp.target=colour"], "mpp.target"),
    (["mpp.mask_fraction=0.8", "mpp.random_fraction=0.3"], "must be <= 1"),
    (["data.mixup_alpha=0.2"], "Mixup / CutMix do not apply"),
    (["mpp.target=patch4x4_3bit", "model.name=Ti/2", "data.img_size=8"], "patch4x4_3bit"),
    (["objective=mae", "mae.decoder_width=30"], "mae.decoder_width=30 must be divisible"),
])
def test_bad_pretraining_configs_are_one_line_errors(tmp_path, capsys, override, message):
    args = ["objective=mpp", *override] if not override[0].startswith("objective") else override
    code = main(["train", *TINY, *args, "steps=1", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_asvit_and_hybrid_encoders_are_refused_in_one_line(tmp_path, capsys):
    code = main(["train", "objective=mae", "model.name=asvit-seed", "data.img_size=32",
                 "data.augment=none", "steps=1", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "needs a ViT with a patch embedding" in err
    # A model the config cannot tell (a checkpoint): refused when the objective is built.
    from vitscale.models.registry import create_model

    with pytest.raises(ConfigError, match="needs a ViT with a patch embedding"):
        MaskedAutoencoder(MAEConfig(), create_model("asvit-seed", num_classes=0, img_size=32))
    hybrid = create_model("R26+S/32", num_classes=0, img_size=64)
    with pytest.raises(ConfigError, match="hybrid"):
        MaskedPatchPrediction(MPPConfig(), hybrid)


def test_sharded_pretraining_is_refused_in_one_line():
    cfg = load_config(None, TINY + ["objective=mpp"])

    class Sharded:
        sharded, replicas = True, 1

        def dp_rank(self, rank):
            return 0

    from vitscale.objectives import build_objective

    with pytest.raises(ConfigError, match="not supported with parallel.dp_shard"):
        build_objective(cfg, tiny_model(), 0, torch.device("cpu"), layout=Sharded())


def test_flat_folder_is_unlabelled_and_refuses_class_folders_in_test(tmp_path):
    from vitscale.config import DataConfig
    from vitscale.data import build_data

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / split / f"{i}.png")
    data = build_data(DataConfig(source=f"imagefolder:{tmp_path}", img_size=8, minival_fraction=0))
    assert not data.labelled and data.num_classes == 0 and len(data.test) == 4
    (tmp_path / "test" / "cats").mkdir()
    with pytest.raises(DataError, match="flat folder of images like the train split"):
        build_data(DataConfig(source=f"imagefolder:{tmp_path}", img_size=8))
