"""The hybrid R+ViT stem against timm's R+ViT hybrids: names, numerics, counts and errors."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from timm.layers import HybridEmbed as TimmHybridEmbed
from timm.layers import StdConv2dSame as TimmStdConv2dSame
from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.errors import ConfigError
from vitscale.models import count, create_model, model_config
from vitscale.models.hybrid import HybridEmbed, hybrid_counts

TINY_VIT = dict(width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)
TIMM_VIT = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere, GroupNorm affine included (zero-init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.1 if p.ndim == 1 else 0.0))


def conv_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def timm_hybrid(layers: tuple[int, ...], width: int, embed_patch: int, img_size) -> TimmViT:
    """timm's R+ViT hybrid assembled as `_resnetv2` + `_create_vision_transformer_hybrid` do,
    but with a shrunken ResNet (stage s: width * 2**s bottleneck channels, 4x that out)."""
    conv = partial(TimmStdConv2dSame, eps=1e-8)
    if layers:
        backbone = ResNetV2(
            layers=layers, channels=tuple(4 * width * 2**s for s in range(len(layers))),
            stem_chs=width, num_classes=0, global_pool="", preact=False, stem_type="same",
            conv_layer=conv,
        )
    else:
        backbone = create_resnetv2_stem(3, width, stem_type="same", preact=False, conv_layer=conv)
    return TimmViT(img_size=img_size, patch_size=embed_patch,
                   embed_layer=partial(TimmHybridEmbed, backbone=backbone), **TIMM_VIT).eval()


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("timm_name,name,overrides", [
    ("vit_small_r26_s32_224", "R26+S/32", {}),
    ("vit_base_r50_s16_224", "R50+B/16", {}),
    ("vit_large_r50_s32_224", "R50+L/32", {}),
    ("vit_tiny_r_s16_p8_224", "Ti/32", dict(stem="hybrid", hybrid_layers=())),
])
def test_state_dict_keys_and_counts_equal_timm_registered_hybrids(timm_name, name, overrides):
    """Full-depth ResNets (only the transformer is shrunk): same keys, in the same order, so
    timm's state dict loads strictly; the analytic counts match timm's embedding module."""
    theirs = timm.create_model(timm_name, pretrained=False, img_size=64, embed_dim=64, depth=1,
                               num_heads=4, num_classes=10).eval()
    ours = create_model(name, img_size=64, width=64, depth=1, heads=4, mlp_dim=256,
                        num_classes=10, **overrides)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)

    params, flops = hybrid_counts(ours.cfg)
    assert params == sum(p.numel() for p in theirs.patch_embed.parameters())
    assert flops == conv_flops(theirs.patch_embed, torch.zeros(1, 3, 64, 64))


# --------------------------------------------------------------------------- numerics
CASES = {
    # name, ResNet blocks per stage, total patch, image size
    "r50_b16_like": ("R50+B/16", (1, 2, 1), 16, 64),
    "r50_b16_patch2": ("R50+B/16", (1, 1, 1), 32, 64),  # proj kernel 2 on the stride-16 map
    "r26_s32_like": ("R26+S/32", (1, 1, 1, 1), 32, (64, 96)),
    "stem_only": ("Ti/32", (), 8, 32),  # R_Ti_16-style: root block, then a 2x2 projection
}


def tiny_pair(case: str):
    name, layers, patch, img = CASES[case]
    ours = create_model(name, stem="hybrid", hybrid_layers=layers, hybrid_width=32, patch=patch,
                        img_size=img, **TINY_VIT).eval()
    theirs = timm_hybrid(layers, 32, ours.cfg.embed_patch[0], img)
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_timm_with_copied_random_weights(case):
    ours, theirs = tiny_pair(case)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    h, w = ours.cfg.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (2, 10)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # GroupNorm and weight-standardisation epsilons barely move logits, so compare them directly.
    ours_modules = dict(ours.patch_embed.named_modules())
    eps = [(n, m.eps) for n, m in theirs.patch_embed.named_modules() if hasattr(m, "eps")]
    assert eps and all(ours_modules[n].eps == e for n, e in eps)


def test_embed_returns_tokens_and_init_is_bit_style():
    ours, _ = tiny_pair("r50_b16_like")
    embed = ours.patch_embed
    assert isinstance(embed, HybridEmbed)
    tokens = embed(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, ours.cfg.num_patches, ours.cfg.width)
    assert torch.isfinite(tokens).all()
    for block in embed.backbone.stages[1].blocks:
        assert torch.count_nonzero(block.norm3.weight) == 0  # each block starts as its shortcut
        assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
    assert embed.backbone.stem.conv.weight.std() > 0


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("case", ["r50_b16_like", "r50_b16_patch2", "stem_only"])
@pytest.mark.parametrize("img_size", [None, (72, 40)])
def test_hybrid_counts_equal_numel_and_flop_counter(case, img_size):
    """(72, 40) is not a multiple of the stride: SAME padding rounds every stride-2 step up."""
    ours, _ = tiny_pair(case)
    embed = ours.patch_embed
    params, flops = hybrid_counts(ours.cfg, img_size)
    assert params == sum(p.numel() for p in embed.parameters())
    h, w = img_size or ours.cfg.img_size
    assert flops == conv_flops(embed, torch.zeros(1, 3, h, w))


def test_model_count_includes_the_hybrid_stem():
    ours, _ = tiny_pair("r26_s32_like")
    h, w = ours.cfg.img_size
    c = count(ours.cfg)
    assert c.params == ours.num_params()
    # With grad enabled and the math SDPA backend every matmul is visible to the counter (the
    # fused no-grad encoder kernel is not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ours(torch.zeros(1, 3, h, w))
    assert c.flops == counter.get_total_flops()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,kwargs,message", [
    ("R50+B/16", dict(patch=8),
     r"patch=\(8, 8\) must be a multiple of the hybrid ResNet stride 16"),
    ("R26+S/32", dict(patch=16), "multiple of the hybrid ResNet stride 32"),
    ("R50+B/8", {}, "hybrid R50 supports patch sizes"),
    ("R50+B/16", dict(hybrid_width=48), "hybrid_width=48 must be a positive multiple of 32"),
    ("R50+B/16", dict(hybrid_layers=(3, 0, 9)), "at least one block per stage"),
])
def test_invalid_hybrid_configs_raise_clear_errors(name, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        create_model(name, **kwargs)
    assert "\n" not in str(info.value)


def test_hybrid_counts_rejects_bad_width_without_building():
    with pytest.raises(ConfigError, match="hybrid_width"):
        hybrid_counts(model_config("R50+B/16", hybrid_width=16))
