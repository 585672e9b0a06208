"""big_vision / AugReg `.npz` reading and writing.

The files under test are laid out by `jax_arrays` below from timm models' weights, independently
of `bigvision.write_npz`, so the reader is checked against a second writer and the logits against
timm (the independent reference).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import HybridEmbed as TimmHybridEmbed
from timm.layers import StdConv2dSame as TimmStdConv2dSame
from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitscale.errors import CheckpointError
from vitscale.models import ModelConfig, VisionTransformer
from vitscale.models.bigvision import is_npz, read_npz, write_npz

D, HEADS, DEPTH, CLASSES = 64, 4, 2, 10
TIMM = dict(img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
            num_classes=CLASSES, act_layer="gelu_tanh")
OURS = dict(img_size=32, patch=8, width=D, depth=DEPTH, heads=HEADS, mlp_dim=128,
            num_classes=CLASSES, act="gelu_tanh")
# Fields the npz determines; name / extra / init details may differ between files.
FIELDS = ("img_size", "patch", "in_chans", "num_classes", "width", "depth", "mlp_dim", "heads",
          "class_token", "posemb", "posemb_include_cls", "qkv_bias", "proj_bias", "mlp_bias",
          "norm_bias", "norm_eps", "act", "pool", "gap_norm", "map_mlp_dim", "head_hidden",
          "stem", "hybrid_layers", "hybrid_width")


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Every tensor random, so a swapped q/k/v, norm1/norm2 or lost bias changes the logits.
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (0.1 if p.ndim == 1 else 0.0))
    return module.eval()


def pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- independent writer
def jax_arrays(sd: dict[str, torch.Tensor], layout: str = "augreg") -> dict[str, np.ndarray]:
    """timm-named weights as the JAX code stores them: HWIO conv kernels, (in, out) Dense
    kernels, (D, H, d) attention kernels and (H, d, D) output kernels, '/'-joined Flax names."""
    w = {k: v.detach().numpy() for k, v in sd.items()}
    heads = HEADS
    out: dict[str, np.ndarray] = {}

    def hwio(key):
        return w[key].transpose(2, 3, 1, 0)

    def dense(src, dst):
        out[f"{dst}/kernel"] = w[f"{src}.weight"].T
        out[f"{dst}/bias"] = w[f"{src}.bias"]

    def ln(src, dst):
        out[f"{dst}/scale"], out[f"{dst}/bias"] = w[f"{src}.weight"], w[f"{src}.bias"]

    def attention(fused, names, dst):
        weight, bias = w[f"{fused}.weight"], w[f"{fused}.bias"]
        rows = weight.shape[0] // len(names)
        for j, name in enumerate(names):
            out[f"{dst}/{name}/kernel"] = weight[j * rows:(j + 1) * rows].T.reshape(D, heads, -1)
            out[f"{dst}/{name}/bias"] = bias[j * rows:(j + 1) * rows].reshape(heads, -1)

    def attention_out(src, dst):
        out[f"{dst}/out/kernel"] = w[f"{src}.weight"].T.reshape(heads, -1, D)
        out[f"{dst}/out/bias"] = w[f"{src}.bias"]

    out["embedding/kernel"] = hwio("patch_embed.proj.weight")
    out["embedding/bias"] = w["patch_embed.proj.bias"]
    if "cls_token" in w:
        out["cls"] = w["cls_token"]
    posemb_key = "Transformer/posembed_input/pos_embedding" if layout == "augreg" else "pos_embedding"
    out[posemb_key] = w["pos_embed"]
    mha, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if layout == "augreg"
                     else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    for i in range(DEPTH):
        src, dst = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        ln(f"{src}.norm1", f"{dst}/LayerNorm_0")
        attention(f"{src}.attn.qkv", ("query", "key", "value"), f"{dst}/{mha}")
        attention_out(f"{src}.attn.proj", f"{dst}/{mha}")
        ln(f"{src}.norm2", f"{dst}/{ln2}")
        dense(f"{src}.mlp.fc1", f"{dst}/{mlp}/Dense_0")
        dense(f"{src}.mlp.fc2", f"{dst}/{mlp}/Dense_1")
    ln("norm", "Transformer/encoder_norm")
    if "attn_pool.latent" in w:
        out["MAPHead_0/probe"] = w["attn_pool.latent"]
        attention("attn_pool.q", ("query",), "MAPHead_0/MultiHeadDotProductAttention_0")
        attention("attn_pool.kv", ("key", "value"), "MAPHead_0/MultiHeadDotProductAttention_0")
        attention_out("attn_pool.proj", "MAPHead_0/MultiHeadDotProductAttention_0")
        ln("attn_pool.norm", "MAPHead_0/LayerNorm_0")
        dense("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0")
        dense("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")
    if "head.weight" in w:
        dense("head", "head")

    # R+ViT hybrid stem: Flax names are 1-based, GroupNorm params stored with old Flax's
    # leading singleton dims so the reader's squeeze is exercised.
    unit = re.compile(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
    flax = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "norm1": "gn1", "norm2": "gn2",
            "norm3": "gn3", "downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}
    for key in w:
        if m := unit.match(key):
            module = m.group(3)
            name = f"block{int(m.group(1)) + 1}/unit{int(m.group(2)) + 1}/{flax[module]}"
        elif key.startswith("patch_embed.backbone.") and key.split(".")[-2] in ("conv", "norm"):
            module = key.split(".")[-2]
            name = "conv_root" if module == "conv" else "gn_root"
        else:
            continue
        if "conv" in module:
            out[f"{name}/kernel"] = hwio(key)
        else:
            leaf = "scale" if key.endswith("weight") else "bias"
            out[f"{name}/{leaf}"] = w[key].reshape(1, 1, 1, -1)
    return out


def save(path: Path, arrays: dict[str, np.ndarray], prefix: str = "") -> Path:
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    return path


def ours_from(path: Path) -> VisionTransformer:
    cfg, sd = read_npz(path)
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module, size: int = 32) -> None:
    x = pixels(size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def timm_token() -> TimmViT:
    return randomize(TimmViT(**TIMM))


# --------------------------------------------------------------------------- reading vs timm
def test_augreg_token_model_matches_timm(tmp_path, timm_token):
    path = save(tmp_path / "Ti_8-augreg.npz", jax_arrays(timm_token.state_dict()))
    assert is_npz(path) and not is_npz(tmp_path / "missing.npz")
    cfg, _ = read_npz(path)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim) == (D, DEPTH, HEADS, 128)
    assert cfg.patch == (8, 8) and cfg.img_size == (32, 32) and cfg.num_classes == CLASSES
    assert cfg.pool == "token" and cfg.class_token and cfg.posemb_include_cls
    assert cfg.posemb_init_std == 0.02 and cfg.act == "gelu_tanh" and cfg.norm_eps == 1e-6
    assert cfg.extra["layout"] == "augreg" and cfg.name == "Ti_8-augreg"
    assert_same_logits(ours_from(path), timm_token)


@pytest.mark.parametrize("pool,prefix,legacy", [
    ("avg", "params/", False),
    ("map", "", False),
    ("map", "opt/target/", True),  # inlined MAP head + pre-2022 posemb inside the encoder
])
def test_big_vision_gap_and_map_match_timm(tmp_path, pool, prefix, legacy):
    theirs = randomize(TimmViT(**TIMM, global_pool=pool, class_token=False, fc_norm=False))
    arrays = jax_arrays(theirs.state_dict(), layout="big_vision")
    if legacy:
        arrays["Transformer/pos_embedding"] = arrays.pop("pos_embedding")
        arrays = {k.removeprefix("MAPHead_0/"): v for k, v in arrays.items()}
    path = save(tmp_path / "bv.npz", arrays, prefix)
    cfg, _ = read_npz(path)
    assert cfg.pool == ("gap" if pool == "avg" else "map") and not cfg.class_token
    assert cfg.gap_norm == "tokens" and not cfg.posemb_include_cls and cfg.map_mlp_dim is None
    assert cfg.posemb_init_std == D**-0.5 and cfg.extra["layout"] == "big_vision"
    assert_same_logits(ours_from(path), theirs)


def test_big_vision_posemb_with_cls_row_is_folded_into_cls(tmp_path, timm_token):
    """Old big_vision files concatenated cls before adding a (1 + g*g)-row posemb: row 0 is
    added into `cls` and the model gets a grid-only posemb, with the same logits."""
    arrays = jax_arrays(timm_token.state_dict(), layout="big_vision")
    path = save(tmp_path / "old_bv.npz", arrays, "params/")
    cfg, sd = read_npz(path)
    assert cfg.class_token and not cfg.posemb_include_cls and sd["pos_embed"].shape == (1, 16, D)
    expected = timm_token.cls_token + timm_token.pos_embed[:, :1]
    torch.testing.assert_close(sd["cls_token"], expected.detach())
    assert_same_logits(ours_from(path), timm_token)


def test_pre_logits_head(tmp_path, timm_token):
    """Original ViT i21k files: Dense + tanh between the class token and the head."""
    gen = torch.Generator().manual_seed(3)
    hidden = 24
    arrays = jax_arrays(timm_token.state_dict())
    pre_w, pre_b = torch.randn(D, hidden, generator=gen), torch.randn(hidden, generator=gen)
    head_w, head_b = torch.randn(hidden, 7, generator=gen), torch.randn(7, generator=gen)
    arrays.update({"pre_logits/kernel": pre_w.numpy(), "pre_logits/bias": pre_b.numpy(),
                   "head/kernel": head_w.numpy(), "head/bias": head_b.numpy()})
    path = save(tmp_path / "ViT-Ti_8.npz", arrays)
    cfg, _ = read_npz(path)
    assert cfg.head_hidden == hidden and cfg.num_classes == 7
    x = pixels()
    with torch.no_grad():
        pooled = timm_token.forward_head(timm_token.forward_features(x), pre_logits=True)
        expected = torch.tanh(pooled @ pre_w + pre_b) @ head_w + head_b
        torch.testing.assert_close(ours_from(path)(x), expected, atol=1e-5, rtol=1e-5)


def test_scan_stacked_blocks_equal_unstacked(tmp_path):
    theirs = randomize(TimmViT(**TIMM, global_pool="map", class_token=False, fc_norm=False))
    arrays = jax_arrays(theirs.state_dict(), layout="big_vision")
    stacked: dict[str, list[np.ndarray]] = {}
    flat = {}
    for key, value in arrays.items():
        m = re.match(r"Transformer/encoderblock_(\d+)/(.+)", key)
        if m:
            stacked.setdefault(m.group(2), []).append((int(m.group(1)), value))
        else:
            flat[key] = value
    for rest, items in stacked.items():
        flat[f"Transformer/encoderblock/{rest}"] = np.stack([v for _, v in sorted(items, key=lambda t: t[0])])
    cfg_a, sd_a = read_npz(save(tmp_path / "loop.npz", arrays))
    cfg_b, sd_b = read_npz(save(tmp_path / "scan.npz", flat, "params/"))
    assert all(getattr(cfg_a, f) == getattr(cfg_b, f) for f in FIELDS)
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_bf16_stored_as_void_is_recovered(tmp_path, timm_token):
    arrays = jax_arrays(timm_token.state_dict())

    def bf16_bits(a: np.ndarray) -> np.ndarray:
        # float32 -> bfloat16 with round-to-nearest-even, kept as raw 2-byte voids (big_vision).
        bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16).view("V2")

    path = save(tmp_path / "bf16.npz", {k: bf16_bits(v) for k, v in arrays.items()})
    assert np.load(path)["cls"].dtype == np.dtype("V2")
    _, sd32 = read_npz(save(tmp_path / "fp32.npz", arrays))
    _, sd16 = read_npz(path)
    assert all(v.dtype == torch.bfloat16 for v in sd16.values())
    assert all(torch.equal(sd16[k], sd32[k].bfloat16()) for k in sd32)


# --------------------------------------------------------------------------- hybrid
def timm_hybrid(layers: tuple[int, ...], width: int = 32) -> TimmViT:
    """timm's R+ViT hybrid with a shrunken BiT ResNet (as its `_resnetv2` builder lays it out)."""
    conv = partial(TimmStdConv2dSame, eps=1e-8)
    if layers:
        backbone = ResNetV2(layers=layers, channels=tuple(4 * width * 2**s for s in range(len(layers))),
                            stem_chs=width, num_classes=0, global_pool="", preact=False,
                            stem_type="same", conv_layer=conv)
    else:
        backbone = create_resnetv2_stem(3, width, stem_type="same", preact=False, conv_layer=conv)
    kw = {**TIMM, "patch_size": 2}  # 2 px on the stride-4 features: 8 px image patches
    return TimmViT(**kw, embed_layer=partial(TimmHybridEmbed, backbone=backbone))


@pytest.mark.parametrize("layers", [(1,), ()])
def test_hybrid_matches_timm(tmp_path, layers):
    theirs = randomize(timm_hybrid(layers))
    arrays = jax_arrays(theirs.state_dict())
    assert arrays["gn_root/scale"].shape == (1, 1, 1, 32)
    if layers:
        assert {"block1/unit1/conv_proj/kernel", "block1/unit1/gn3/bias"} <= set(arrays)
    path = save(tmp_path / "R_Ti.npz", arrays)
    cfg, sd = read_npz(path)
    assert cfg.stem == "hybrid" and cfg.hybrid_layers == layers and cfg.hybrid_width == 32
    assert cfg.patch == (8, 8) and cfg.img_size == (32, 32)
    theirs_sd = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    assert_same_logits(ours_from(path), theirs)


# --------------------------------------------------------------------------- writing
def _ours(seed: int = 0, **kw) -> VisionTransformer:
    return randomize(VisionTransformer(ModelConfig(**{**OURS, **kw})), seed)


@pytest.mark.parametrize("layout,kw", [
    ("augreg", dict(pool="token", posemb_include_cls=True)),
    ("augreg", dict(pool="gap", head_hidden=24)),
    ("big_vision", dict(pool="map", posemb_include_cls=False, map_mlp_dim=96, qkv_bias=False,
                        norm_bias=False)),
    ("big_vision", dict(pool="token", posemb_include_cls=False, num_classes=0)),
    ("augreg", dict(stem="hybrid", hybrid_layers=(1,), hybrid_width=32)),
    ("big_vision", dict(pool="gap", posemb="sincos2d", posemb_include_cls=False, img_size=224, patch=32)),
])
def test_write_read_round_trip_is_exact(tmp_path, layout, kw):
    model = _ours(**kw)
    path = write_npz(model.cfg, model.state_dict(), tmp_path / "out.npz", layout=layout)
    assert path == tmp_path / "out.npz" and is_npz(path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no temp file left behind
    keys = set(np.load(path).files)
    if layout == "augreg":
        assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel" in keys
    else:
        assert "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel" in keys
    cfg, sd = read_npz(path)
    assert {f: getattr(cfg, f) for f in FIELDS} == {f: getattr(model.cfg, f) for f in FIELDS}
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("layout,include_cls", [("augreg", False), ("big_vision", True)])
def test_write_converts_posemb_cls_row_between_layouts(tmp_path, layout, include_cls):
    """augreg gets a zero cls row prepended; big_vision gets the cls row folded into cls.
    Either way the reloaded model computes the same logits."""
    model = _ours(pool="token", posemb_include_cls=include_cls)
    path = write_npz(model.cfg, model.state_dict(), tmp_path / "x.npz", layout=layout)
    cfg, sd = read_npz(path)
    assert cfg.posemb_include_cls is (layout == "augreg")
    if layout == "augreg":
        assert torch.equal(sd["pos_embed"][:, 0], torch.zeros(1, D))
    assert_same_logits(ours_from(path), model)


def test_bf16_state_dict_round_trip(tmp_path):
    model = _ours(pool="map", posemb_include_cls=False)
    ref = {k: v.bfloat16() for k, v in model.state_dict().items()}
    path = write_npz(model.cfg, ref, tmp_path / "bf16.npz", layout="big_vision")
    assert np.load(path)["pos_embedding"].dtype == np.dtype("V2")
    _, sd = read_npz(path)
    assert all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------- errors
def _one_line_error(path: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        read_npz(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_read_errors_are_one_line(tmp_path, timm_token):
    _one_line_error(tmp_path / "missing.npz", "not found")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00not a zip\x01" * 50)
    _one_line_error(junk, "not an .npz")
    assert not is_npz(junk)
    _one_line_error(save(tmp_path / "other.npz", {"foo/kernel": np.ones(3, np.float32)}),
                    "no ViT parameters", "embedding/kernel")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.ones(3))
    _one_line_error(npy, "single .npy")
    arrays = jax_arrays(timm_token.state_dict())
    arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query_norm/scale"] = np.ones(16)
    _one_line_error(save(tmp_path / "extra.npz", arrays), "cannot hold", "query_norm")
    arrays = jax_arrays(timm_token.state_dict())
    arrays["embedding/kernel"] = arrays["embedding/kernel"].reshape(-1, D)
    _one_line_error(save(tmp_path / "naflex.npz", arrays), "NaFlex")
    arrays = jax_arrays(timm_token.state_dict())
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    _one_line_error(save(tmp_path / "cut.npz", arrays), "missing", "LayerNorm_1/scale")


def test_write_errors(tmp_path):
    model = _ours(qk_norm=True)
    with pytest.raises(CheckpointError, match="QK LayerNorm"):
        write_npz(model.cfg, model.state_dict(), tmp_path / "a.npz")
    model = _ours()
    with pytest.raises(CheckpointError, match="unknown npz layout"):
        write_npz(model.cfg, model.state_dict(), tmp_path / "a.npz", layout="flax")
    with pytest.raises(CheckpointError, match="lacks 'head.weight'"):
        sd = model.state_dict()
        del sd["head.weight"]
        write_npz(model.cfg, sd, tmp_path / "a.npz")
    assert not (tmp_path / "a.npz").exists()


# --------------------------------------------------------------------------- non-square grids
@pytest.mark.parametrize("layout,size,timm_kw", [
    ("big_vision", (32, 48), dict(global_pool="map", class_token=False, fc_norm=False)),  # 24 rows
    ("augreg", (32, 40), {}),  # 4x5 grid + class-token row = 21 rows
])
def test_non_square_learned_posemb_loads_at_the_given_img_size(tmp_path, layout, size, timm_kw):
    """The rows of a learned table do not say its grid's shape: given img_size, the table is read
    on that grid (as big_vision does, by the shapes alone); without it, a one-line error names
    the img_size to pass."""
    from vitscale.models import load

    theirs = randomize(TimmViT(**{**TIMM, "img_size": size}, **timm_kw))
    path = save(tmp_path / "wide.npz", jax_arrays(theirs.state_dict(), layout))
    _one_line_error(path, "not a square", f"img_size={size}")
    with pytest.raises(CheckpointError, match=r"does not fit img_size \(64, 64\).*img_size="):
        load(path, img_size=64)
    model = load(path, img_size=size)
    assert model.cfg.grid_size == (size[0] // 8, size[1] // 8)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout,size,kw,timm_kw", [
    ("augreg", (32, 40), dict(pool="token"), {}),
    ("big_vision", (32, 48), dict(pool="gap", posemb_include_cls=False),
     dict(global_pool="avg", class_token=False, fc_norm=False)),
])
def test_non_square_learned_grid_writes_and_reads_back(tmp_path, layout, size, kw, timm_kw):
    """write_npz stores a non-square table (big_vision's (1, N, D) holds any grid): it reads back
    exactly at the img_size it was written at, and timm's own npz loader gives the same logits."""
    from timm.models.vision_transformer import _load_weights

    model = _ours(img_size=size, **kw)
    path = write_npz(model.cfg, model.state_dict(), tmp_path / "wide.npz", layout=layout)
    cfg, sd = read_npz(path, img_size=size)
    assert {f: getattr(cfg, f) for f in FIELDS} == {f: getattr(model.cfg, f) for f in FIELDS}
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    theirs = TimmViT(**{**TIMM, "img_size": size}, **timm_kw).eval()
    _load_weights(theirs, str(path))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)


def test_write_refuses_a_non_square_grid_that_readers_take_for_a_square(tmp_path):
    # 4x6 patches + a class-token row = 25 rows: every reader without a size would see 5x5.
    model = _ours(img_size=(32, 48), pool="token")
    with pytest.raises(CheckpointError, match="25 rows.*5x5.*layout='big_vision'"):
        write_npz(model.cfg, model.state_dict(), tmp_path / "a.npz", layout="augreg")
    path = write_npz(model.cfg, model.state_dict(), tmp_path / "b.npz", layout="big_vision")
    assert read_npz(path, img_size=(32, 48))[0].grid_size == (4, 6)


# --------------------------------------------------------------------------- sin-cos files
def bv_sincos(h: int, w: int, dim: int) -> np.ndarray:
    """big_vision's posemb_sincos_2d (MoCo v3): integer (row, col) positions on an h x w grid."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / 10_000 ** (np.arange(dim // 4) / (dim // 4 - 1))
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


GAP = dict(global_pool="avg", class_token=False, fc_norm=False)


def big_vision_logits(theirs: TimmViT, x: torch.Tensor) -> torch.Tensor:
    """What big_vision computes for a sin-cos file: the same weights with the table recomputed
    on the input's own grid, run by timm."""
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    ref = TimmViT(**{**TIMM, "img_size": tuple(x.shape[-2:])}, **GAP).eval()
    sd = {**theirs.state_dict(), "pos_embed": torch.from_numpy(bv_sincos(h, w, D)).float()[None]}
    ref.load_state_dict(sd)
    with torch.no_grad():
        return ref(x)


def test_sincos_npz_gives_big_vision_outputs_at_any_input_size(tmp_path):
    """A sin-cos .npz records no size (no trained grid): at every input size, and whatever img_size
    it is loaded or converted at, the logits are big_vision's (integer positions on the input's
    grid). Measuring positions on the assumed 224-px grid instead moves them by whole logits."""
    from safetensors.torch import load_file

    from vitscale.eval.api import load_model
    from vitscale.models import load
    from vitscale.models import save as save_ours
    from vitscale.models.weights import save_timm

    theirs = randomize(TimmViT(**TIMM, **GAP))
    with torch.no_grad():
        theirs.patch_embed.proj.weight.mul_(0.2)  # patch tokens about the posemb's size, as trained
    arrays = jax_arrays(theirs.state_dict(), layout="big_vision")
    del arrays["pos_embedding"]
    path = save(tmp_path / "sincos.npz", arrays)
    x64, x32 = pixels(64), pixels(32)
    want64, want32 = big_vision_logits(theirs, x64), big_vision_logits(theirs, x32)

    as_read = load(path)  # built at the assumed 224 px
    assert as_read.cfg.img_size == (224, 224) and as_read.cfg.posemb_input_grid
    at32 = load(path, img_size=32)
    save_ours(as_read, tmp_path / "converted")
    converted = load(tmp_path / "converted")
    with torch.no_grad():
        for model in (as_read, at32, converted, load_model(path, img_size=64)):
            torch.testing.assert_close(model(x64), want64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at32(x32), want32, atol=1e-5, rtol=1e-5)
        # The old reading, positions on the assumed 224-px (28x28) grid's scale, is 0.15 off
        # (logits up to 1.1), 10^4 times the tolerance above.
        trained_grid = load(path, img_size=64, posemb_input_grid=False, posemb_ref_grid=(28, 28))
        assert (trained_grid(x64) - want64).abs().max() > 0.1

    # timm's pos_embed is a table for one grid: the size must be said, not assumed.
    with pytest.raises(CheckpointError, match="records no image size.*img_size") as info:
        save_timm(as_read, tmp_path / "t.safetensors")
    assert "\n" not in str(info.value)
    save_timm(load(path, img_size=64), tmp_path / "t.safetensors")
    timm64 = TimmViT(**{**TIMM, "img_size": 64}, **GAP).eval()
    timm64.load_state_dict(load_file(str(tmp_path / "t.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(timm64(x64), want64, atol=1e-5, rtol=1e-5)
