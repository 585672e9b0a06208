"""The model family against timm (the independent reference), plus configs, counts and errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ParallelScalingBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.errors import ConfigError
from vitscale.models import SIZES, ModelConfig, count, create_model, model_config
from vitscale.models.posemb import resample_grid, resample_patch_kernel, sincos_2d
from vitscale.models.weights import adapt_state_dict, load_state_dict_into

TINY = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)


def tiny(**kw):
    """Our tiny model matching TINY (width 64, depth 2, 4 heads, MLP 128, 10 classes)."""
    base = dict(width=64, depth=2, heads=4, mlp_dim=128, num_classes=10, img_size=32, patch=8)
    base.update(kw)
    return create_model(ModelConfig(**base)).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (zero-init heads or tokens would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0) * 0.1)


def copy_and_compare(ours, theirs, x, atol=1e-5):
    randomize(theirs)
    load_state_dict_into(ours, theirs.state_dict(), ours.cfg)
    with torch.no_grad():  # the fused inference path where the block allows it
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    # With autograd on, the module path runs: it must match too.
    torch.testing.assert_close(ours(x).detach(), b, atol=atol, rtol=0)
    return a


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- timm parity
def test_class_token_learned_posemb_matches_timm(images):
    theirs = TimmViT(img_size=32, patch_size=8, **TINY).eval()
    ours = tiny()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    copy_and_compare(ours, theirs, images)


@pytest.mark.parametrize("gap_norm,fc_norm", [("pooled", True), ("tokens", False)])
def test_gap_both_norm_orders_match_timm(images, gap_norm, fc_norm):
    theirs = TimmViT(img_size=32, patch_size=8, class_token=False, global_pool="avg",
                     fc_norm=fc_norm, **TINY).eval()
    ours = tiny(pool="gap", gap_norm=gap_norm)
    copy_and_compare(ours, theirs, images)


def test_gap_norm_orders_differ(images):
    """The two orders are genuinely different functions (so the switch matters)."""
    a, b = tiny(pool="gap", gap_norm="pooled"), tiny(pool="gap", gap_norm="tokens")
    randomize(a)
    sd = a.state_dict()
    sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    b.load_state_dict(sd)
    with torch.no_grad():
        assert (a(images) - b(images)).abs().max() > 1e-3


def test_map_head_matches_timm(images):
    theirs = TimmViT(img_size=32, patch_size=8, class_token=False, global_pool="map", **TINY)
    copy_and_compare(tiny(pool="map"), theirs.eval(), images)


def test_qk_norm_matches_timm(images):
    theirs = TimmViT(img_size=32, patch_size=8, qk_norm=True, **TINY).eval()
    ours = tiny(qk_norm=True)
    copy_and_compare(ours, theirs, images)


def test_parallel_block_matches_timm_parallel_scaling_block(images):
    theirs = TimmViT(img_size=32, patch_size=8, block_fn=ParallelScalingBlock, qkv_bias=False,
                     qk_norm=True, **TINY).eval()
    randomize(theirs)
    from vitscale.models.weights import timm_parallel_to_vitscale, vitscale_parallel_to_timm

    ours = tiny(block="parallel", qk_norm=True, qkv_bias=False)
    sd = timm_parallel_to_vitscale(theirs.state_dict())
    ours.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=0)
    back = vitscale_parallel_to_timm(ours.state_dict())
    assert set(back) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(back[k], v)


def test_parallel_block_formula(images):
    """y = x + Attn(LN(x)) + MLP(LN(x)) with one LayerNorm, computed by hand."""
    model = tiny(block="parallel", depth=1)
    randomize(model)
    blk = model.blocks[0]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        y = torch.nn.functional.layer_norm(x, (64,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        expected = x + blk.attn(y) + blk.mlp(y)
        torch.testing.assert_close(blk(x), expected)
    assert not hasattr(blk, "norm2")


def test_no_class_token_sincos_matches_timm(images):
    theirs = TimmViT(img_size=32, patch_size=8, class_token=False, global_pool="avg",
                     fc_norm=False, **TINY).eval()
    randomize(theirs)
    ours = tiny(pool="gap", posemb="sincos2d")
    sd = theirs.state_dict()
    with torch.no_grad():  # timm's learned table set to our fixed sin-cos values
        theirs.pos_embed.copy_(ours.pos_embed_fixed)
    sd = {k: v for k, v in theirs.state_dict().items() if k != "pos_embed"}
    ours.load_state_dict(sd)
    assert "pos_embed" not in ours.state_dict()  # fixed: never stored
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=0)


def test_sincos_matches_big_vision_formula():
    """Independent numpy version of big_vision's posemb_sincos_2d (omega over K - 1)."""
    h, w, width = 3, 5, 16
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4 - 1))
    ay = np.einsum("m,d->md", y.flatten(), omega)
    ax = np.einsum("m,d->md", x.flatten(), omega)
    expected = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1)
    np.testing.assert_allclose(sincos_2d((h, w), width).numpy(), expected, atol=1e-6)


def test_sincos_on_a_reference_grid_keeps_patch_positions():
    """A 12x8 grid measured in a 4x6 grid's units: patch centres where they fall on that grid,
    computed here patch by patch; the grid's own units give big_vision's integers."""
    width, grid, ref = 8, (12, 8), (4, 6)
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4 - 1))
    rows = []
    for y in range(grid[0]):
        for x in range(grid[1]):
            py = (y + 0.5) * ref[0] / grid[0] - 0.5
            px = (x + 0.5) * ref[1] / grid[1] - 0.5
            rows.append(np.concatenate([np.sin(px * omega), np.cos(px * omega),
                                        np.sin(py * omega), np.cos(py * omega)]))
    np.testing.assert_allclose(sincos_2d(grid, width, ref_grid=ref).numpy(), np.stack(rows),
                               atol=1e-6)
    assert torch.equal(sincos_2d(grid, width, ref_grid=grid), sincos_2d(grid, width))
    # Any grid of the reference's size is the reference itself, exactly.
    assert torch.equal(sincos_2d(ref, width, ref_grid=ref), sincos_2d(ref, width))


def test_sincos_model_at_another_input_size_keeps_positions(images):
    """A dynamic-size forward at 48 px equals the model rebuilt at 48 px (weights loaded), both
    with positions measured on the trained 4x4 grid."""
    model = tiny(pool="gap", posemb="sincos2d", dynamic_img_size=True).eval()
    randomize(model)
    at48 = tiny(pool="gap", posemb="sincos2d", img_size=48, posemb_ref_grid=(4, 4)).eval()
    at48.load_state_dict(model.state_dict())
    big = F.interpolate(images, size=48, mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(model(big), at48(big), atol=1e-6, rtol=0)
    expected = sincos_2d((6, 6), model.cfg.width, ref_grid=(4, 4))
    torch.testing.assert_close(at48.pos_embed_fixed[0], expected)


def test_learned_posemb_with_a_sincos_start(images, tmp_path):
    """posemb_init='sincos2d': the learned table starts as the fixed sin-cos one (class-token row
    zero), so the model computes what the fixed-table model does; resampled to a larger grid it
    stays within a few percent of the sin-cos positions measured on the trained grid."""
    from vitscale.models import load, save

    learned = tiny(posemb="learn", posemb_init="sincos2d")
    assert torch.equal(learned.pos_embed[0, 0], torch.zeros(64))
    assert torch.equal(learned.pos_embed[0, 1:], sincos_2d((4, 4), 64))
    fixed = tiny(posemb="sincos2d")
    randomize(fixed)
    missing = learned.load_state_dict(fixed.state_dict(), strict=False).missing_keys
    assert missing == ["pos_embed"]
    with torch.no_grad():
        torch.testing.assert_close(learned(images), fixed(images), atol=1e-6, rtol=0)
    save(learned, tmp_path / "m")
    table = load(tmp_path / "m", img_size=48).pos_embed[0, 1:].detach()
    exact = sincos_2d((6, 6), 64, ref_grid=(4, 4))
    assert (table - exact).norm() / exact.norm() < 0.05
    assert (sincos_2d((6, 6), 64) - exact).norm() / exact.norm() > 0.2  # what 0.05 rules out
    with pytest.raises(ConfigError, match="posemb_init='bogus' is not valid"):
        ModelConfig(posemb_init="bogus")
    with pytest.raises(ConfigError, match="width divisible by 4"):
        ModelConfig(width=66, heads=6, posemb_init="sincos2d")


@pytest.mark.parametrize("img_size,patch", [((32, 48), 8), ((32, 32), (8, 4))])
def test_non_square_grid_matches_timm(img_size, patch):
    x = torch.randn(2, 3, *img_size)
    theirs = TimmViT(img_size=img_size, patch_size=patch, **TINY).eval()
    ours = tiny(img_size=img_size, patch=patch)
    assert ours.cfg.grid_size == (img_size[0] // ours.cfg.patch[0], img_size[1] // ours.cfg.patch[1])
    copy_and_compare(ours, theirs, x)


def test_load_at_new_resolution_matches_timm_resampling(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    from vitscale.models import load

    src = TimmViT(img_size=32, patch_size=8, **TINY).eval()
    randomize(src)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    # timm's own path: a 48 px model and its checkpoint filter (bicubic, antialias, cls kept).
    dst = TimmViT(img_size=48, patch_size=8, **TINY).eval()
    dst.load_state_dict(checkpoint_filter_fn(src.state_dict(), dst))
    ours = load(tmp_path / "vit.safetensors", img_size=48, heads=4).eval()
    assert ours.pos_embed.shape == (1, 37, 64)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), dst(x), atol=1e-5, rtol=0)
    # The class-token row is carried over untouched.
    torch.testing.assert_close(ours.pos_embed[:, 0], src.pos_embed[:, 0])


def test_big_vision_resampling_equals_scipy_zoom_order1():
    from scipy import ndimage

    grid = torch.randn(1, 1 + 16, 8)
    out = resample_grid(grid, (6, 6), (4, 4), num_prefix_tokens=1, mode="bilinear",
                        antialias=False, align_corners=True)
    zoomed = ndimage.zoom(grid[0, 1:].reshape(4, 4, 8).numpy(), (1.5, 1.5, 1), order=1)
    np.testing.assert_allclose(out[0, 1:].reshape(6, 6, 8).numpy(), zoomed, atol=1e-5)
    torch.testing.assert_close(out[:, :1], grid[:, :1])


@pytest.mark.parametrize("mode, antialias", [("bicubic", True), ("bilinear", False)])
def test_patch_kernel_pi_resize_equals_timm(mode, antialias):
    from timm.layers import resample_patch_embed

    kernel = torch.randn(8, 3, 4, 4)
    for size in ((6, 6), (2, 2), (4, 6)):
        ours = resample_patch_kernel(kernel, size, mode, antialias)
        theirs = resample_patch_embed(kernel, list(size), interpolation=mode, antialias=antialias)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_pi_resized_kernel_gives_the_same_token_for_a_resized_patch(mode):
    kernel = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    patches = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    big = F.interpolate(patches, size=(6, 6), mode=mode)
    new = resample_patch_kernel(kernel, (6, 6), mode)  # antialias is ignored for nearest
    before = torch.einsum("ncij,dcij->nd", patches, kernel)
    after = torch.einsum("ncij,dcij->nd", big, new)
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)
    # Loading a /4 model as /6 at 1.5x the resolution keeps the grid and the position table.
    src = model_config("Ti/4", img_size=32, depth=1, num_classes=10)
    sd = create_model(src).state_dict()
    out = adapt_state_dict(sd, src, src.replace(img_size=48, patch=6))
    assert out["patch_embed.proj.weight"].shape == (192, 3, 6, 6)
    torch.testing.assert_close(out["pos_embed"], sd["pos_embed"])


def test_adapt_state_dict_moves_between_cls_row_layouts():
    src = model_config("Ti/16", img_size=32, patch=8, depth=1, num_classes=10)
    dst = src.replace(posemb_include_cls=False)
    sd = {"pos_embed": torch.randn(1, 17, 192)}
    out = adapt_state_dict(sd, src, dst)
    torch.testing.assert_close(out["pos_embed"], sd["pos_embed"][:, 1:])
    back = adapt_state_dict(out, dst, src)
    assert back["pos_embed"].shape == (1, 17, 192) and back["pos_embed"][0, 0].abs().sum() == 0


@pytest.mark.parametrize("size", [(48, 48), (24, 40)])
def test_dynamic_img_size_resamples_on_the_fly(size):
    # The on-the-fly path must give what rebuilding the model at that size (posemb resampled by
    # load_state_dict_into, the load path) gives; a zero-free posemb so the resampling shows.
    torch.manual_seed(0)
    model = tiny(dynamic_img_size=True)
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
    x = torch.randn(2, 3, *size)
    rebuilt = tiny(img_size=size)
    load_state_dict_into(rebuilt, model.state_dict(), model.cfg)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, rebuilt(x), rtol=0, atol=1e-5)
        # ... and not what a wrong table would give: rows shuffled change the logits.
        rebuilt.pos_embed.copy_(rebuilt.pos_embed[:, torch.randperm(rebuilt.pos_embed.shape[1])])
        assert (out - rebuilt(x)).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="patch grid"):
        tiny()(torch.randn(1, 3, 48, 48))


# --------------------------------------------------------------------------- sizes and configs
def test_named_sizes_are_as_published():
    published = {  # width, depth, MLP, heads
        "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
        "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16),
        "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16), "e": (1792, 56, 15360, 16),
        "22B": (6144, 48, 24576, 48),
    }
    assert set(SIZES) == set(published)
    for name, dims in published.items():
        s = SIZES[name]
        assert (s.width, s.depth, s.mlp_dim, s.heads) == dims
    vit22b = model_config("22B/14")
    assert (vit22b.block, vit22b.qk_norm, vit22b.qkv_bias, vit22b.norm_bias, vit22b.pool) == (
        "parallel", True, False, False, "map")
    assert vit22b.mlp_bias and not vit22b.class_token


def test_published_parameter_counts():
    # ViT paper Table 1 (86M, 307M, 632M) and Scaling ViT Table 2 (g 1011M, G 1843M), without
    # the classifier. The ViT paper's L figure is ~1% above the architecture's exact count.
    for name, millions in [("B/16", 86), ("L/16", 307), ("H/14", 632), ("g/14", 1011),
                           ("G/14", 1843)]:
        params = count(model_config(name, num_classes=0)).params / 1e6
        assert abs(params / millions - 1) < 0.015, (name, params)
    # ViT-B/16 at 224 px: 17.56 GMACs as in timm's tables.
    assert abs(count(model_config("B/16")).flops / 2e9 - 17.56) < 0.01


def test_override_pool_drops_class_token():
    cfg = model_config("B/16", pool="gap")
    assert cfg.class_token is False and cfg.seq_len == 196
    assert model_config("B/16", pool="gap", class_token=True).seq_len == 197


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="X/16"), "unknown model name 'X/16'.*'Ti', 'S'"),
    (dict(name="B/16", heads=7), "not divisible by model.heads=7"),
    (dict(name="B/16", img_size=100), "image height 100 is not divisible by patch 16"),
    (dict(name="B/16", pool="mean"), "model.pool='mean' is not valid; choose one of"),
    (dict(name="B/16", wdith=3), "unknown model option.*wdith"),
    (dict(name="B/16", drop_path=1.5), "drop_path=1.5 must be in"),
    (dict(name="B/16", pool="token", class_token=False), "needs model.class_token=true"),
])
def test_invalid_configs_raise_clear_errors(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=message) as info:
        create_model(name, **kwargs)
    assert "\n" not in str(info.value)


def test_config_dict_round_trip():
    cfg = model_config("S/16", pool="map", qk_norm=True, img_size=(224, 160))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("kw", [
    dict(),
    dict(pool="gap", gap_norm="pooled"),
    dict(pool="map", qkv_bias=False, norm_bias=False, block="parallel", qk_norm=True),
    dict(pool="gap", posemb="sincos2d", head_hidden=48, mlp_bias=False),
    dict(img_size=(32, 48), patch=(8, 4), proj_bias=False),
    dict(pool="none"),
])
def test_analytic_counts_match_torch(kw):
    model = tiny(**kw)
    expected = count(model.cfg)
    assert expected.params == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, *model.cfg.img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * expected.flops


# --------------------------------------------------------------------------- behaviour
def test_heads_and_representations():
    model = tiny(head_hidden=48, head_zero_init=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 17, 64)
    pooled = model.forward_pooled(x)
    assert pooled.shape == (2, 48) and pooled.abs().max() <= 1  # tanh pre-logits
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model(x), torch.zeros(2, 10))
    features_only = tiny(pool="none", num_classes=0)
    assert features_only(x).shape == (2, 16, 64)


def test_head_bias_init_and_reset_head():
    model = tiny(head_bias_init=-10.0)
    assert torch.all(model.head.bias == -10.0)
    model.reset_head(3)
    assert model.head.out_features == 3 and model.cfg.num_classes == 3
    assert torch.count_nonzero(model.head.weight) == 0


def test_drop_path_rates_increase_linearly_and_apply_per_sample():
    model = tiny(depth=5, drop_path=0.4)
    rates = [b.drop_path1.rate if hasattr(b.drop_path1, "rate") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    dp = model.blocks[4].drop_path1.train()
    torch.manual_seed(0)
    out = dp(torch.ones(4000, 3))
    kept = (out[:, 0] > 0).float()
    assert abs(kept.mean().item() - 0.6) < 0.03
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / 0.6)))
    assert torch.all(out == out[:, :1])  # whole samples, not elements
    assert torch.equal(dp.eval()(torch.ones(5, 3)), torch.ones(5, 3))


def test_eval_is_deterministic_and_train_uses_dropout():
    model = tiny(dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_backward_reaches_every_parameter():
    model = tiny(pool="map", qk_norm=True, head_hidden=32).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_model_names_are_an_independent_reference():
    """A registered timm ViT-Ti/16 has the same parameter count as our Ti/16."""
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert sum(p.numel() for p in theirs.parameters()) == count(model_config("Ti/16")).params


def test_fused_inference_path_equals_module_path():
    model = tiny()
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    assert all(b.fusable for b in model.blocks)
    with torch.no_grad():
        fused = model(x)
        for b in model.blocks:
            b.fusable = False
        plain = model(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
