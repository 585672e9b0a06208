"""The ModelConfig switches a detector needs: window attention with global blocks, inputs of any
size (padded to the patch, posemb resampled on the fly), and layer-wise lr decay in the groups."""

from __future__ import annotations

import pytest
import torch

from vitscale.config import OptimConfig
from vitscale.errors import ConfigError
from vitscale.models import create_model
from vitscale.optim import param_groups

TINY = dict(width=16, depth=3, heads=2, mlp_dim=32, num_classes=5)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()  # tiny ops: one thread is faster on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("Ti/4", img_size=16, **{**TINY, **kw}).eval()


@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_all_blocks_global_equals_plain_vit(block):
    plain = _tiny(block=block)
    windowed = _tiny(block=block, window_size=2, global_blocks=(0, 1, 2))
    windowed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), windowed(x))
        # Windows in every block change the outputs (the switch does something).
        windowed.set_windows(2)
        assert not torch.allclose(plain(x), windowed(x))


@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
def test_window_token_sees_only_its_window(size):
    # One windowed block, no prefix tokens: a token's output depends on the tokens of its own
    # 2 x 2 window only. Grid 4x4 (4x6): patch (0, 0)'s window is patches (0..1, 0..1).
    model = _tiny(depth=1, pool="gap", window_size=2, dynamic_img_size=True)
    block, grid = model.blocks[0], (size[0] // 4, size[1] // 4)
    x = torch.randn(1, grid[0] * grid[1], 16)
    block.grid = grid
    with torch.no_grad():
        base = block(x)
        outside = x.clone()
        outside[0, 2] += torch.randn(16)  # patch (0, 2): the next window (LN ignores shifts)
        assert torch.equal(block(outside)[0, 0], base[0, 0])
        assert not torch.allclose(block(outside)[0, 2], base[0, 2])
        inside = x.clone()
        inside[0, grid[1] + 1] += torch.randn(16)  # patch (1, 1): the window of (0, 0)
        assert not torch.allclose(block(inside)[0, 0], base[0, 0])


def test_window_attention_matches_per_window_reference():
    # A 3x5 grid in windows of 2: padded to 4x6, six windows; each real token's output is the
    # attention over its window's tokens (the zero padding included, as ViTDet), computed here
    # window by window.
    model = _tiny(depth=1, pool="gap", window_size=2, dynamic_img_size=True)
    block = model.blocks[0]
    gh, gw = 3, 5
    x = torch.randn(1, gh * gw, 16)
    block.grid = (gh, gw)
    with torch.no_grad():
        y = block.norm1(x).reshape(gh, gw, 16)
        padded = torch.zeros(4, 6, 16)
        padded[:gh, :gw] = y
        ref = torch.zeros(4, 6, 16)
        for r in range(0, 4, 2):
            for c in range(0, 6, 2):
                win = padded[r:r + 2, c:c + 2].reshape(1, 4, 16)
                ref[r:r + 2, c:c + 2] = block.attn(win).reshape(2, 2, 16)
        from vitscale.models.layers import attend

        out = attend(block, block.norm1(x)).reshape(gh, gw, 16)
    torch.testing.assert_close(out, ref[:gh, :gw], rtol=1e-5, atol=1e-6)


def test_prefix_tokens_in_windowed_blocks_attend_among_themselves():
    model = _tiny(depth=1, window_size=2)  # class token
    block = model.blocks[0]
    x = torch.randn(1, 1 + 16, 16)
    block.grid = (4, 4)
    with torch.no_grad():
        base = block(x)
        moved = x.clone()
        moved[0, 1:] += torch.randn(16, 16)  # every patch token
        assert torch.equal(block(moved)[0, 0], base[0, 0])


def test_any_input_size_padded_and_posemb_resampled():
    model = _tiny(dynamic_img_size=True, dynamic_img_pad=True, window_size=2, global_blocks=(2,))
    x = torch.randn(1, 3, 18, 23)  # pads to 20 x 24: a 5 x 6 grid
    with torch.no_grad():
        tokens = model.forward_features(x)
        padded = torch.nn.functional.pad(x, (0, 1, 0, 2))
        torch.testing.assert_close(tokens, model.forward_features(padded), rtol=0, atol=0)
    assert tokens.shape == (1, 1 + 5 * 6, 16)
    strict = _tiny(dynamic_img_size=True)
    with pytest.raises(ConfigError, match="dynamic_img_pad=true"):
        strict.forward_features(x)


def test_window_config_errors():
    with pytest.raises(ConfigError, match="global_blocks"):
        _tiny(window_size=2, global_blocks=(3,))
    with pytest.raises(ConfigError, match="window_size"):
        _tiny(window_size=-1)


def _lrs(model, decay, **kw):
    groups = param_groups(model, OptimConfig(lr=1.0, layer_decay=decay, **kw))
    return {name: g["lr"] for g in groups for name in g["param_names"]}


def test_layer_decay_vit():
    model = _tiny()  # depth 3
    d = 0.5
    lrs = _lrs(model, d)
    for i in range(3):
        for name in ("blocks.%d.attn.qkv.weight", "blocks.%d.norm1.bias", "blocks.%d.mlp.fc2.weight"):
            assert lrs[name % i] == pytest.approx(d ** (3 - i))
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
        assert lrs[name] == pytest.approx(d ** 4)  # the lowest
    for name in ("norm.weight", "head.weight", "head.bias"):
        assert lrs[name] == 1.0
    assert min(lrs.values()) == pytest.approx(d ** 4)
    # lr_mults multiply on top; off (None) leaves every lr alone.
    assert _lrs(model, d, lr_mults={"head": 0.1})["head.weight"] == pytest.approx(0.1)
    assert set(_lrs(model, None).values()) == {1.0}


def test_layer_decay_inside_a_wrapper_and_asvit():
    vit = _tiny()
    wrapped = torch.nn.ModuleDict({"body": vit, "neck": torch.nn.Linear(4, 4)})
    lrs = _lrs(wrapped, 0.5)
    assert lrs["body.blocks.0.attn.qkv.weight"] == pytest.approx(0.125)
    assert lrs["neck.weight"] == 1.0  # outside the ViT: full lr
    asvit = create_model("asvit:8,2,3,2|4,1,2,1|4,1,4,1|4,1,6,1|4,8", img_size=32, num_classes=3)
    lrs = _lrs(asvit, 0.5)  # 5 blocks over the stages: layers 1..5, top 6
    assert lrs["tokenizer.proj.weight"] == pytest.approx(0.5 ** 6)
    assert lrs["stages.0.1.mlp.fc1.weight"] == pytest.approx(0.5 ** 4)  # block 2 of 5
    assert lrs["reembeds.0.reduction.weight"] == pytest.approx(0.5 ** 3)  # with stages.1.0
    assert lrs["stages.3.0.attn.qkv.weight"] == pytest.approx(0.5 ** 1)
    assert lrs["head.weight"] == 1.0
    with pytest.raises(ConfigError, match="layer_decay"):
        _lrs(torch.nn.Linear(3, 3), 0.5)


def test_sequence_parallel_refuses_window_attention():
    from vitscale.parallel.tp import check_tp

    model = create_model("Ti/4", img_size=16, width=16, depth=2, heads=2, mlp_dim=32,
                         pool="gap", window_size=2)
    check_tp(model, 2, False)  # tensor parallelism alone: windows are whole on every rank
    with pytest.raises(ConfigError, match="sequence_parallel=false"):
        check_tp(model, 2, True)


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_window_flops_count_what_runs(size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vitscale.models import count

    # A 3x3 / 3x5 grid in windows of 2 (padded to 4x4 / 4x6), a class token, one global block.
    model = _tiny(window_size=2, global_blocks=(1,), dynamic_img_size=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # no fused path
        model(torch.randn(1, 3, *size))
    assert counter.get_total_flops() == count(model.cfg, size).flops


def test_formats_without_windows_refuse_them(tmp_path):
    from vitscale.errors import CheckpointError
    from vitscale.models import load, save
    from vitscale.models.weights import save_timm

    model = _tiny(window_size=2, global_blocks=(1,))
    with pytest.raises(CheckpointError, match="window attention"):
        save_timm(model, tmp_path / "timm.safetensors")
    save(model, tmp_path / "vit")  # vitscale's format keeps the switch
    assert load(tmp_path / "vit").cfg.global_blocks == (1,)
    model.set_windows(0)
    save_timm(model, tmp_path / "timm.safetensors")
