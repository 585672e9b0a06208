"""vitscale's own checkpoint format, timm state dicts, safe loading and clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitscale.errors import CheckpointError, ConfigError
from vitscale.models import create_model, load, read_checkpoint, save
from vitscale.models.weights import save_timm
from vitscale.utils.io import atomic_write

TINY = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)


def ours(**kw):
    base = dict(width=64, depth=2, heads=4, mlp_dim=128, num_classes=10, img_size=32, patch=8,
                name="S/16")
    base.update(kw)
    from vitscale.models import ModelConfig

    return create_model(ModelConfig(**base)).eval()


def timm_model(**kw):
    model = TimmViT(**{"img_size": 32, "patch_size": 8, **TINY, **kw}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_own_format_round_trip(tmp_path, name):
    model = ours(pool="map", qk_norm=True, posemb="sincos2d")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save(model, tmp_path / name)
    again = load(tmp_path / name)
    assert again.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    if name == "ckpt":
        doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert doc["format"] == "vitscale" and doc["model"]["pool"] == "map"


def test_timm_pickle_loads_with_weights_only(tmp_path):
    theirs = timm_model(global_pool="avg", class_token=False)
    torch.save(theirs.state_dict(), tmp_path / "vit.pth")
    model = load(tmp_path / "vit.pth", heads=4)
    assert model.cfg.pool == "gap" and model.cfg.gap_norm == "pooled"
    with torch.no_grad():
        torch.testing.assert_close(model(X), theirs(X), atol=1e-5, rtol=0)


def test_timm_checkpoint_wrapped_in_state_dict_key(tmp_path):
    theirs = timm_model()
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "wrapped.pt")
    assert load(tmp_path / "wrapped.pt", heads=4).cfg.num_classes == 10


class Evil:
    def __reduce__(self):  # would run code under a plain unpickler
        return (print, ("unpickled untrusted code",))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"weights": Evil()}, fh)
    with pytest.raises(CheckpointError, match="is not a valid checkpoint") as info:
        load(path)
    assert "\n" not in str(info.value)
    assert "unpickled" not in capsys.readouterr().out


@pytest.mark.parametrize("content,suffix", [
    (b"definitely not a checkpoint", ".safetensors"),
    (b"\x00" * 64, ".pth"),
    (b"PK\x03\x04 truncated zip", ".bin"),
])
def test_corrupt_files_give_one_line_errors(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad") as info:
        load(path)
    assert "\n" not in str(info.value)


def test_truncated_safetensors(tmp_path):
    save(ours(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load(tmp_path / "m.safetensors")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load(tmp_path / "nope.safetensors")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.txt'"):
        load(tmp_path / "weights.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text('{"format": "vitsc')  # a torn write
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON \(.*\); re-save"):
        load(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds no JSON object"):
        load(tmp_path / "folder")


def test_wrong_shapes_and_heads_are_named(tmp_path):
    from vitscale.models.weights import load_state_dict_into

    theirs = timm_model()
    wider = ours(width=128, mlp_dim=256)
    with pytest.raises(CheckpointError, match=r"shapes differ: .*patch_embed.proj.weight "
                       r"\(64, 3, 8, 8\) vs model \(128, 3, 8, 8\)"):
        load_state_dict_into(wider, theirs.state_dict(), wider.cfg)
    gap, token = ours(pool="gap"), ours()
    with pytest.raises(CheckpointError, match="missing cls_token.*check the model name"):
        load_state_dict_into(token, gap.state_dict(), gap.cfg)
    with pytest.raises(CheckpointError, match="pos_embed has 17 rows.*grid needs 16"):
        load_state_dict_into(gap, theirs.state_dict(), gap.cfg)
    five = ours(num_classes=5)
    with pytest.raises(CheckpointError, match="head has 10 classes but the model wants 5"):
        load_state_dict_into(five, theirs.state_dict(), ours().cfg)


def test_new_num_classes_gives_a_zero_head(tmp_path):
    theirs = timm_model()
    save_file(theirs.state_dict(), str(tmp_path / "t.safetensors"))
    model = load(tmp_path / "t.safetensors", heads=4, num_classes=3)
    assert model.head.out_features == 3 and torch.count_nonzero(model.head.weight) == 0
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, theirs.blocks[0].attn.qkv.weight)


def test_timm_hub_folder_layout(tmp_path):
    """A folder as timm models sit on the Hugging Face hub: config.json + model.safetensors."""
    theirs = timm_model(img_size=48)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(theirs.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_48", "num_classes": 10,
        "pretrained_cfg": {"input_size": [3, 48, 48]}, "model_args": {"num_heads": 4},
    }))
    model = load(folder)  # heads come from model_args
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=0)


def test_timm_export_round_trip(tmp_path):
    model = ours(block="parallel", qkv_bias=False)
    save_timm(model, tmp_path / "out.pth")
    sd = torch.load(tmp_path / "out.pth", weights_only=True)
    assert "blocks.0.in_proj.weight" in sd and "blocks.0.attn.qkv.weight" not in sd
    cfg, back = read_checkpoint(tmp_path / "out.pth", heads=4)
    assert cfg.block == "parallel" and not cfg.qkv_bias
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v)


@pytest.mark.parametrize("kw, timm_kw", [
    (dict(pool="gap", class_token=False, gap_norm="pooled"),
     dict(global_pool="avg", class_token=False)),
    (dict(pool="token"), dict(no_embed_class=True)),
    # loaded at 48 px: positions measured on the trained 4x4 grid, not integers on 6x6
    (dict(pool="token", img_size=48, posemb_ref_grid=(4, 4)), dict(img_size=48, no_embed_class=True)),
])
def test_sincos_model_exports_to_timm_with_its_fixed_table(tmp_path, kw, timm_kw):
    model = ours(posemb="sincos2d", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_timm(model, tmp_path / "out.safetensors")
    theirs = TimmViT(**{"img_size": 32, "patch_size": 8, **TINY, **timm_kw}).eval()
    from safetensors.torch import load_file

    theirs.load_state_dict(load_file(str(tmp_path / "out.safetensors")))  # strict: nothing missing
    size = model.cfg.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    back = load(tmp_path / "out.safetensors", heads=4)
    assert back.cfg.posemb == "learn" and not back.cfg.posemb_include_cls
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temp file left behind


def test_override_that_the_model_family_lacks_is_named(tmp_path):
    from vitscale.models import create_model, save

    save(create_model("asvit:8,2,3|4,1,2|4,1,4|4,1,6|8,8", num_classes=3, img_size=32), tmp_path)
    with pytest.raises(ConfigError, match="patch: not a setting of .*AsViTConfig; its settings are"):
        load(tmp_path, patch=6)


def test_sincos_model_at_a_new_size_keeps_the_trained_positions(tmp_path):
    """Loading a sin-cos model on another grid measures positions on the trained grid (what
    resampling does to a learned table), survives save/load, and stays with the first grid
    through a second resize; naming the new grid gives big_vision's integer positions."""
    from vitscale.models.bigvision import write_npz
    from vitscale.models.posemb import sincos_2d

    save(ours(pool="gap", posemb="sincos2d"), tmp_path / "at32")  # 4x4 grid
    at48 = load(tmp_path / "at32", img_size=48)
    assert at48.cfg.posemb_ref_grid == (4, 4)
    torch.testing.assert_close(at48.pos_embed_fixed[0], sincos_2d((6, 6), 64, ref_grid=(4, 4)))
    save(at48, tmp_path / "at48")
    assert load(tmp_path / "at48").cfg.posemb_ref_grid == (4, 4)
    at64 = load(tmp_path / "at48", img_size=64)
    assert at64.cfg.posemb_ref_grid == (4, 4)
    assert load(tmp_path / "at48", img_size=32).cfg.posemb_ref_grid is None  # back home
    recomputed = load(tmp_path / "at32", img_size=48, posemb_ref_grid=(6, 6))
    assert recomputed.cfg.posemb_ref_grid is None
    torch.testing.assert_close(recomputed.pos_embed_fixed[0], sincos_2d((6, 6), 64))
    with pytest.raises(CheckpointError, match="cannot store sin-cos positions on another grid"):
        write_npz(at48.cfg, at48.state_dict(), tmp_path / "x.npz")
    # A big_vision file records no size (224 px is assumed) and no trained grid: it is built at
    # the size given on load, with big_vision's integer positions there and on any other input.
    npz = write_npz(recomputed.cfg, recomputed.state_dict(), tmp_path / "bv.npz")
    assert load(npz).cfg.img_size == (224, 224) and load(npz).cfg.extra["img_size_assumed"]
    from_npz = load(npz, img_size=48)
    assert from_npz.cfg.posemb_ref_grid is None and "img_size_assumed" not in from_npz.cfg.extra
    assert from_npz.cfg.posemb_input_grid
    torch.testing.assert_close(from_npz.pos_embed_fixed[0], sincos_2d((6, 6), 64))
    with pytest.raises(ConfigError, match="posemb_ref_grid=.* needs posemb='sincos2d'"):
        ours(posemb="learn", posemb_ref_grid=(2, 2))
