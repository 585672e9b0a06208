"""As-ViT topology: arch strings, published sizes, analytic counts, re-tokenization, stages."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.errors import ConfigError
from vitscale.models.asvit import (
    SEED,
    AsViTConfig,
    asvit_config,
    asvit_counts,
    create_asvit,
    same_padding,
    stage_grids,
)


def test_arch_strings_round_trip():
    large = asvit_config("asvit-large")
    assert large.kernels == (8, 4, 4, 4) and large.splits == (2, 1, 1, 1)
    assert large.expansions == (3, 2, 4, 6) and large.depths == (5, 2, 5, 2)
    assert large.heads == 32 and large.width == 180
    assert large.widths == (180, 360, 720, 1024) and large.stage_heads == (4, 8, 16, 32)
    assert AsViTConfig.from_arch(large.arch()) == large.replace(name="asvit")
    assert asvit_config(large.arch()).name == f"asvit:{large.arch()}"
    seed = AsViTConfig.from_arch(SEED)
    assert seed.depths == (1, 1, 1, 1) and seed.width == 32
    for bad in ("8,2,3|4,1,2|4,1,4|32", "8,2|4,1,2|4,1,4|4,1,6|32", "a,2,3|4,1,2|4,1,4|4,1,6|32"):
        with pytest.raises(ConfigError, match="bad As-ViT topology"):
            AsViTConfig.from_arch(bad)
    with pytest.raises(ConfigError, match="unknown As-ViT model"):
        asvit_config("asvit-huge")
    with pytest.raises(ConfigError, match="not divisible by its"):
        AsViTConfig.from_arch("8,2,3|4,1,2|4,1,4|4,1,6|64,36")


def hand_layers(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor's shape, written out from the topology as the paper and public code
    describe the layers (not from vitscale's code): conv tokenizer + LayerNorm; per stage, a
    re-embedding (LayerNorm over K*K*C_in values, Linear without bias) then pre-LN blocks of
    qkv/proj attention and a fc1/fc2 MLP of width E*C; final LayerNorm, tanh pre-logits, head."""
    stages = [[int(v) for v in part.split(",")] for part in arch.split("|")[:4]]
    c = int(arch.split("|")[4].split(",")[1])
    widths = [min(1024, c * 2**i) for i in range(4)]  # channel doubling, capped at 1024
    k1 = stages[0][0]
    shapes = {"tokenizer.proj.weight": (widths[0], 3, k1, k1), "tokenizer.proj.bias": (widths[0],),
              "tokenizer.norm.weight": (widths[0],), "tokenizer.norm.bias": (widths[0],)}
    for i, (_kernel, _split, expansion, depth) in enumerate(stages):
        d, hidden = widths[i], expansion * widths[i]
        for j in range(depth):
            pre = f"stages.{i}.{j}."
            shapes.update({pre + "norm1.weight": (d,), pre + "norm1.bias": (d,),
                           pre + "attn.qkv.weight": (3 * d, d), pre + "attn.qkv.bias": (3 * d,),
                           pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,),
                           pre + "norm2.weight": (d,), pre + "norm2.bias": (d,),
                           pre + "mlp.fc1.weight": (hidden, d), pre + "mlp.fc1.bias": (hidden,),
                           pre + "mlp.fc2.weight": (d, hidden), pre + "mlp.fc2.bias": (d,)})
    for i, (kernel, *_rest) in enumerate(stages[1:], start=1):
        fan_in = kernel * kernel * widths[i - 1]
        shapes.update({f"reembeds.{i - 1}.norm.weight": (fan_in,),
                       f"reembeds.{i - 1}.norm.bias": (fan_in,),
                       f"reembeds.{i - 1}.reduction.weight": (widths[i], fan_in)})
    d = widths[-1]
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "pre_logits.fc.weight": (d, d),
                   "pre_logits.fc.bias": (d,), "head.weight": (num_classes, d),
                   "head.bias": (num_classes,)})
    return shapes


def hand_params(arch: str) -> int:
    return sum(math.prod(shape) for shape in hand_layers(arch).values())


def test_hand_layer_list_is_the_models_layout():
    for arch in (asvit_config("asvit-seed").arch(), "5,4,2,2|3,2,3,1|2,2,4,3|3,1,5,1|16,24"):
        model = create_asvit(AsViTConfig.from_arch(arch))
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == hand_layers(arch)


def test_published_sizes():
    # The public code's seed at C = 32 and As-ViT Large, counted by hand from their layer lists;
    # the paper reports Large at 88.1M parameters and 22.6 G (multiply-accumulates) at 224 px.
    seed, large = asvit_config("asvit-seed"), asvit_config("asvit-large")
    # seed: tokenizer 6,240 + blocks 10,624 / 33,472 / 198,272 / 1,052,416 + re-embeddings
    # 33,792 / 133,120 / 528,384 + final norm, pre-logits, head 512 + 65,792 + 257,000.
    assert hand_params(seed.arch()) == 2_319_624
    assert hand_params(large.arch()) == 87_580_820
    assert asvit_counts(seed).params == 2_319_624 and asvit_counts(large).params == 87_580_820
    assert abs(87_580_820 / 88.1e6 - 1) < 0.006
    assert abs(asvit_counts(large).flops / 2 / 22.6e9 - 1) < 0.02


PAPER_SIZES = {"asvit-small": (29.0e6, 5.3e9), "asvit-base": (52.6e6, 8.9e9)}  # params, MACs


def _deviation(cfg, sizes):
    # Parameters by hand; FLOPs from asvit_counts (checked against torch's FlopCounterMode below).
    return max(abs(hand_params(cfg.arch()) / sizes[0] - 1),
               abs(asvit_counts(cfg).flops / 2 / sizes[1] - 1))


def test_small_and_base_are_the_reconstruction_rule():
    """Small/Base: of all seed growths on one monotone path to Large (depths and width never
    shrink) within 2% of both published sizes, the pair with the smallest largest deviation."""
    large = asvit_config("asvit-large")
    within = {name: [] for name in PAPER_SIZES}
    for depths in itertools.product(*(range(1, d + 1) for d in large.depths)):
        for width in range(32, large.width + 1, 4):
            cfg = large.replace(depths=depths, width=width)
            for name, sizes in PAPER_SIZES.items():
                if _deviation(cfg, sizes) < 0.02:
                    within[name].append(cfg)
    pairs = [(s, b) for s in within["asvit-small"] for b in within["asvit-base"]
             if all(x <= y for x, y in zip((*s.depths, s.width), (*b.depths, b.width)))]
    assert len(pairs) == 2  # the rule has a real choice to make
    best = min(pairs, key=lambda p: max(_deviation(c, PAPER_SIZES[n])
                                        for c, n in zip(p, PAPER_SIZES)))
    for cfg, name in zip(best, PAPER_SIZES):
        assert cfg.arch() == asvit_config(name).arch()
        assert _deviation(asvit_config(name), PAPER_SIZES[name]) < 0.01
    assert hand_params(asvit_config("asvit-small").arch()) == 29_140_360
    assert asvit_counts(asvit_config("asvit-small")).params == 29_140_360


@pytest.mark.parametrize("img, stride, dilation, arch", [
    (224, 4, 1, SEED),
    (200, 4, 1, "5,4,2|3,2,3|2,2,4|3,1,5|16,16"),  # grids 50/25/13/7: padded windows
    (64, 8, 2, "4,8,2,2|4,4,3,1|2,2,2,1|4,1,2,1|16,16"),  # re-tokenized
])
def test_counts_equal_numel_and_flop_counter(img, stride, dilation, arch):
    model = create_asvit(AsViTConfig.from_arch(arch, num_classes=10)).eval()
    model.set_tokenizer(stride, dilation)
    counts = asvit_counts(model.cfg, img, stride=stride)
    assert counts.params == sum(p.numel() for p in model.parameters())
    # The math SDPA kernel shows its matmuls to the counter; CPU flash attention does not.
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, img, img))
    assert counts.flops == fc.get_total_flops()


def test_same_padding_matches_the_public_code():
    # Tokenizer (stride 4): (K-4)//2 before, (K-3)//2 after; re-embedding (stride 2): (K-2)//2,
    # (K-1)//2, on even sizes.
    for k in (4, 5, 6, 7, 8):
        assert same_padding(224, k, 4) == ((k - 4) // 2, (k - 3) // 2)
    for k in (2, 3, 4):
        assert same_padding(56, k, 2) == ((k - 2) // 2, (k - 1) // 2)


def test_window_attention_equals_global_attention_per_window():
    torch.manual_seed(0)
    model = create_asvit(AsViTConfig.from_arch("4,2,2|2,1,2|2,1,2|2,1,2|8,8", num_classes=3))
    attn = model.stages[0][0].attn
    x = torch.randn(2, 6, 6, 8)  # split 2 -> four 3x3 windows
    out = attn(x)
    split_s = attn.split
    attn.split = 1
    for i in (0, 3):
        for j in (0, 3):
            torch.testing.assert_close(out[:, i:i + 3, j:j + 3], attn(x[:, i:i + 3, j:j + 3]))
    attn.split = split_s
    # A 5x5 grid with split 2: windows of 3 padded to 6x6, padding masked out of attention.
    y = torch.randn(1, 5, 5, 8)
    out = attn(y)
    attn.split = 1
    torch.testing.assert_close(out[:, :3, :3], attn(y[:, :3, :3]))
    torch.testing.assert_close(out[:, 3:, 3:], attn(y[:, 3:, 3:]))


def test_retokenization_keeps_weights_and_follows_the_grid():
    model = create_asvit(AsViTConfig.from_arch(SEED, num_classes=10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 128, 128)
    shapes = {}
    for stride, dilation in ((16, 5), (8, 2), (4, 1)):
        model.set_tokenizer(stride, dilation)
        stages = model.forward_features(x, return_stages=True)
        shapes[(stride, dilation)] = [tuple(s.shape[-2:]) for s in stages]
        assert model(x).shape == (2, 10)
    assert shapes[(16, 5)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert shapes[(4, 1)] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [g for g in stage_grids(model.cfg, 128, stride=8)] == shapes[(8, 2)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="stride and dilation"):
        model.set_tokenizer(0)


def test_stage_features_and_training_step():
    model = create_asvit(AsViTConfig.from_arch(SEED, width=16, num_classes=5, drop_path=0.1))
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x, return_stages=True)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    assert model.forward_pooled(x).shape == (2, 128)
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_train_save_load_and_evaluate_an_asvit(tmp_path):
    from vitscale.config import load_config
    from vitscale.eval import evaluate_checkpoint
    from vitscale.models import load
    from vitscale.train import run

    cfg = load_config(None, ["model.name=asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16", "data.img_size=32",
                             "data.batch_size=32", "steps=4", "progress=false",
                             "model.overrides.drop_path=0.1", f"out_dir={tmp_path}"])
    result = run(cfg)
    model = load(tmp_path / "model")
    assert type(model).__name__ == "AsViT" and model.cfg.kernels == (4, 2, 2, 2)
    assert model.cfg.num_classes == 10 and model.cfg.drop_path == 0.1
    m = evaluate_checkpoint(tmp_path, "digits")
    assert m["top1"] == pytest.approx(result.metrics["test/accuracy"])
    with pytest.raises(ConfigError, match="model.overrides"):
        load_config(None, ["model.name=asvit-seed", "model.overrides.pool=gap"])


def test_progressive_retokenization_in_training(tmp_path):
    import json

    from vitscale.config import load_config
    from vitscale.models import load
    from vitscale.train import Trainer

    arch = "model.name=asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16"
    common = [arch, "data.img_size=64", "data.batch_size=16", "steps=9", "progress=false",
              "log_every=1"]
    schedule = "retokenize=[[0,16,5],[0.34,8,2],[0.67,4,1]]"
    trainer = Trainer(load_config(None, [*common, schedule, f"out_dir={tmp_path / 'r'}"]))
    assert [p[:3] for p in trainer.phases] == [(0, 16, 5), (3, 8, 2), (6, 4, 1)]
    result = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["tokenizer"] for r in train] == [[16, 5]] * 3 + [[8, 2]] * 3 + [[4, 1]] * 3
    # FLOPs by hand from the analytic counts of the three token grids (4x4, 8x8, 16x16).
    cfg = trainer.model.cfg
    per_image = [asvit_counts(cfg, 64, stride=s).flops for s in (16, 8, 4)]
    spent = 3 * 16 * 3 * sum(per_image)
    assert result.metrics["train_flops"] == pytest.approx(spent)
    assert result.metrics["flops_saved"] == pytest.approx(1 - sum(per_image) / (3 * per_image[2]))
    assert load(tmp_path / "r" / "model").cfg.tokenizer_stride == 4

    plain = Trainer(load_config(None, [*common, f"out_dir={tmp_path / 'p'}"])).fit()
    assert plain.metrics["train_flops"] == pytest.approx(3 * 16 * 9 * per_image[2])
    with pytest.raises(ConfigError, match="must begin at 0 and increase"):
        load_config(None, [*common, "retokenize=[[0.5,16,5]]"])
    with pytest.raises(ConfigError, match="is not \\[start"):
        load_config(None, [*common, "retokenize=[[0,16]]"])


def test_models_table_lists_asvit(capsys):
    import json

    from vitscale.cli import main

    assert main(["models", "asvit-large", "asvit:8,2,3|4,1,2|4,1,4|4,1,6|32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["params_m"] == 87.58 and rows[0]["gflops"] == 44.72  # 22.36 GMACs
    assert rows[1]["params_m"] == 2.32 and rows[1]["depth"] == 4
