"""Hugging Face transformers ViT folders: read, write, and hub downloads (no network)."""

from __future__ import annotations

import fnmatch
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from vitscale.errors import CheckpointError
from vitscale.models import ModelConfig, VisionTransformer, create_model, hf

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8, layer_norm_eps=1e-12)


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Every tensor random, so swapped q/k/v, norm1/norm2 or a lost bias changes the output.
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def _pixels(h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def _ours(folder: Path, **kwargs) -> VisionTransformer:
    cfg, sd = hf.read_transformers(folder, **kwargs)
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> tuple[Path, ViTForImageClassification]:
    folder = tmp_path_factory.mktemp("hf_cls")
    theirs = _randomize(ViTForImageClassification(ViTConfig(**TINY, num_labels=10)))
    theirs.save_pretrained(folder)
    return folder, theirs


# ---------------------------------------------------------------------------------- reading
def test_classifier_logits_match(classifier_dir):
    folder, theirs = classifier_dir
    assert hf.is_transformers_dir(folder) and not hf.is_transformers_dir(folder / "nope")
    cfg, _ = hf.read_transformers(folder)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim) == (64, 2, 4, 128)
    assert cfg.norm_eps == 1e-12 and cfg.act == "gelu" and cfg.num_classes == 10
    assert cfg.pool == "token" and cfg.head_hidden is None and cfg.posemb_include_cls
    x = _pixels()
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
        torch.testing.assert_close(_ours(folder)(x), expected, atol=1e-5, rtol=0)
        # The generic loader dispatches transformers folders here too.
        from vitscale.models import load

        torch.testing.assert_close(load(folder).eval()(x), expected, atol=1e-5, rtol=0)


def test_tanh_gelu_model_matches(tmp_path):
    theirs = _randomize(ViTForImageClassification(
        ViTConfig(**TINY, num_labels=3, hidden_act="gelu_new", qkv_bias=False)))
    theirs.save_pretrained(tmp_path)
    model = _ours(tmp_path)
    assert model.cfg.act == "gelu_tanh" and not model.cfg.qkv_bias
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_vitmodel_pooler_is_pre_logits(tmp_path):
    theirs = _randomize(ViTModel(ViTConfig(**TINY)))
    theirs.save_pretrained(tmp_path)
    model = _ours(tmp_path)
    assert model.cfg.head_hidden == 64 and model.cfg.num_classes == 0
    x = _pixels()
    with torch.no_grad():
        out = theirs(pixel_values=x)
        torch.testing.assert_close(model.forward_pooled(x), out.pooler_output, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x), out.last_hidden_state,
                                   atol=1e-5, rtol=0)
        bare = _ours(tmp_path, pooler=False)
        assert bare.cfg.head_hidden is None
        torch.testing.assert_close(bare.forward_pooled(x), out.last_hidden_state[:, 0],
                                   atol=1e-5, rtol=0)


def test_pickle_and_sharded_layouts(classifier_dir, tmp_path):
    folder, theirs = classifier_dir
    from safetensors.torch import load_file

    # transformers 4.x wrote a plain torch.save'd state dict; it is read with weights_only.
    legacy = load_file(str(folder / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "bin" / "config.json")
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    x = _pixels()
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
        for sub in ("bin", "sharded"):
            torch.testing.assert_close(_ours(tmp_path / sub)(x), expected, atol=1e-5, rtol=0)


def test_bad_folders_give_one_line_errors(classifier_dir, tmp_path):
    folder, _ = classifier_dir
    shutil.copytree(folder, tmp_path / "relu")
    doc = json.loads((tmp_path / "relu" / "config.json").read_text())
    doc["hidden_act"] = "relu"
    (tmp_path / "relu" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="relu") as err:
        hf.read_transformers(tmp_path / "relu")
    assert "\n" not in str(err.value)

    doc.update(hidden_act="gelu", image_size=64)  # config no longer fits the position table
    (tmp_path / "relu" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="pos_embed"):
        hf.read_transformers(tmp_path / "relu")

    (tmp_path / "empty").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf.read_transformers(tmp_path / "empty")


# ---------------------------------------------------------------------------------- writing
def test_round_trip_classifier_non_square(tmp_path):
    cfg = ModelConfig(width=64, depth=2, heads=4, mlp_dim=128, img_size=(32, 48), patch=(8, 16),
                      num_classes=5, act="gelu_tanh", norm_eps=1e-6)
    ours = _randomize(create_model(cfg), seed=3)
    hf.write_transformers(ours.cfg, ours.state_dict(), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["architectures"] == ["ViTForImageClassification"] and doc["image_size"] == [32, 48]

    theirs = ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = _pixels(32, 48)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, ours(x), atol=1e-5, rtol=0)
    back, sd = hf.read_transformers(tmp_path)
    assert (back.img_size, back.patch, back.act, back.norm_eps) == ((32, 48), (8, 16),
                                                                    "gelu_tanh", 1e-6)
    for key, value in ours.state_dict().items():
        assert torch.equal(sd[key], value), key


def test_round_trip_pooler_model(tmp_path):
    ours = _randomize(create_model(ModelConfig(width=64, depth=2, heads=4, mlp_dim=128,
                                               img_size=32, patch=8, num_classes=0,
                                               head_hidden=64)), seed=4)
    hf.write_transformers(ours.cfg, ours.state_dict(), tmp_path)
    theirs = ViTModel.from_pretrained(tmp_path).eval()
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).pooler_output, ours.forward_pooled(x),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, words", [
    (dict(pool="gap"), "GAP pooling"),
    (dict(pool="map"), "MAP pooling"),
    (dict(posemb="sincos2d"), "sincos2d"),
    (dict(block="parallel", qk_norm=True), "parallel blocks, QK LayerNorm"),
    (dict(posemb_include_cls=False), "class-token row"),
    (dict(head_hidden=32), "pre-logits"),
])
def test_write_refuses_what_transformers_cannot_hold(tmp_path, overrides, words):
    cfg = ModelConfig(width=64, depth=1, heads=4, mlp_dim=128, img_size=32, patch=8,
                      num_classes=3, **overrides)
    with pytest.raises(CheckpointError, match=words) as err:
        hf.write_transformers(cfg, {}, tmp_path / "out")
    assert "\n" not in str(err.value) and "--to vitscale" in str(err.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- hub
def test_parse_hub_ref():
    assert hf.parse_hub_ref("hf-hub:google/vit-base-patch16-224") == (
        "google/vit-base-patch16-224", None)
    assert hf.parse_hub_ref("hf-hub:org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("hf-hub:", "hf-hub:org/name@", "hf-hub:a/b/c", "hf-hub:org name"):
        with pytest.raises(CheckpointError, match="hf-hub:ORG/NAME"):
            hf.parse_hub_ref(bad)


def _fake_hub(monkeypatch, repo: Path, calls: list) -> None:
    """snapshot_download that copies the files of `repo` matching allow_patterns."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **_):
        calls.append((repo_id, revision, list(allow_patterns)))
        out = Path(cache_dir) / "snapshots" / (revision or "main")
        out.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_download_hub_safetensors(classifier_dir, tmp_path, monkeypatch):
    folder, theirs = classifier_dir
    shutil.copytree(folder, tmp_path / "repo")
    torch.save({}, tmp_path / "repo" / "pytorch_model.bin")  # present, must not be fetched
    calls: list = []
    _fake_hub(monkeypatch, tmp_path / "repo", calls)
    got = hf.download_hub(*hf.parse_hub_ref("hf-hub:org/tiny@v1"), cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and calls[0][:2] == ("org/tiny", "v1")
    assert not (got / "pytorch_model.bin").exists()
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(_ours(got)(x), theirs(pixel_values=x).logits,
                                   atol=1e-5, rtol=0)


def test_download_hub_falls_back_to_bin(classifier_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    folder, theirs = classifier_dir
    (tmp_path / "repo").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "repo" / "config.json")
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "repo" / "pytorch_model.bin")
    calls: list = []
    _fake_hub(monkeypatch, tmp_path / "repo", calls)
    got = hf.download_hub("org/tiny", cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and "pytorch_model.bin" in calls[1][2]
    assert "pytorch_model.bin" not in calls[0][2]
    cfg, _ = hf.read_transformers(got)
    assert cfg.num_classes == 10


def test_download_hub_errors(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**_):
        raise OSError("Cannot reach https://huggingface.co\nretry later")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not download hf-hub:org/nope") as err:
        hf.download_hub("org/nope", cache_dir=tmp_path)
    assert "\n" not in str(err.value)

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install vitscale\[hub\]"):
        hf.download_hub("org/nope")
