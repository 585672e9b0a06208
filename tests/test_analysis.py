"""vitscale.analysis against closed forms and references written here: the explicit attention
path against the fused kernels, mean attention distance of uniform / identity attention, rollout
against its matrix product, IG's completeness and a Riemann sum, PCA against numpy's SVD, the
corruptions' definitions, and the CLI on the shared trained digits ViT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vitscale.analysis import (
    analyze_model,
    attention_distance,
    attention_rollout,
    corrupt,
    filter_components,
    integrated_gradients,
    layer_distance,
    mean_attention_distance,
    posemb_similarity,
    position_table,
    record_attention,
    robustness,
    token_centres,
)
from vitscale.analysis.attention import LayerGeometry
from vitscale.cli import main
from vitscale.errors import ConfigError
from vitscale.models import create_model


def _vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, width=32, depth=2, heads=2, mlp_dim=64, num_classes=10)
    args.update(kw)
    return create_model("Ti/4", **args).eval()


def _asvit(img=36):
    torch.manual_seed(0)
    return create_model("asvit-seed", img_size=img, width=16, heads=8, num_classes=10).eval()


def _mean_pairwise(gh, gw, step):
    """The closed form of uniform attention: the mean distance over all (query, key) pairs of
    patch centres on a gh x gw grid, `step` pixels apart (numpy, all pairs)."""
    yy, xx = np.meshgrid((np.arange(gh) + 0.5) * step, (np.arange(gw) + 0.5) * step, indexing="ij")
    c = np.stack([yy.ravel(), xx.ravel()], 1)
    return np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)).mean()


# ---------------------------------------------------------------------------------- paths
def test_explicit_attention_path_gives_the_fused_logits():
    x = torch.randn(3, 3, 16, 16)
    for model in (_vit(), _vit(block="parallel", qk_norm=True)):
        with torch.no_grad():
            fused = model(x)  # the fused CPU encoder layer where the block allows it, else SDPA
        sdpa = model(x).detach()  # grad mode: the module path with F.scaled_dot_product_attention
        with torch.no_grad(), record_attention(model) as rec:
            explicit = model(x)
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(explicit, sdpa, atol=1e-5, rtol=1e-5)
        assert [p[0].shape for p in rec.probs] == [(3, 2, 17, 17)] * 2
        torch.testing.assert_close(rec.probs[0][0].sum(-1), torch.ones(3, 2, 17))
        # the first layer's probabilities are Attention.attention_weights of its input
        tokens = model._pos_embed(model.patch_embed(x), (4, 4))
        ref = model.blocks[0].attn.attention_weights(model.blocks[0].norm1(tokens))
        torch.testing.assert_close(rec.probs[0][0], ref.detach())
        assert all(b.attn.recorded is None for b in model.blocks)  # switched back to SDPA
    asvit = _asvit()  # 9x9 grid in 2x2 windows: padded, masked windows
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        fused = asvit(x)
        with record_attention(asvit) as rec:
            explicit = asvit(x)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    first = rec.probs[0][0]  # (2 images * 4 windows, 1 head, 25, 25)
    assert first.shape == (8, 1, 25, 25) and rec.layers[0].window == (5, 5)
    torch.testing.assert_close(first.sum(-1), torch.ones(8, 1, 25))
    assert float(first[1, 0, :, 4::5].sum()) == 0.0  # window (0, 1): its last column is padding


# ---------------------------------------------------------------------------------- distance
def _uniform(model):
    """Zero the query and key projections: every score 0, attention uniform over the keys."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
                p[: 2 * (p.shape[0] // 3)] = 0
    return model


def test_distance_of_uniform_attention_is_the_mean_pairwise_patch_distance():
    x = torch.randn(2, 3, 16, 16)
    res = attention_distance(_uniform(_vit()), x)
    expected = _mean_pairwise(4, 4, 4.0)
    assert np.allclose(res["distance"], expected, atol=1e-6, rtol=0)
    assert res["units"] == "pixels" and len(res["distance"]) == 2 and len(res["distance"][0]) == 2
    # As-ViT: uniform within each window; stage s tokens are 4 * 2^s pixels apart. At 32 px the
    # grids are 8, 4, 2, 1 and the windows 4x4, 4x4, 2x2, 1x1 (no padding).
    res = attention_distance(_uniform(_asvit(32)), torch.randn(2, 3, 32, 32))
    for layer, (w, step) in zip(res["distance"], [(4, 4), (4, 8), (2, 16), (1, 32)]):
        assert np.allclose(layer, _mean_pairwise(w, w, step), atol=1e-6, rtol=0)


def test_distance_of_identity_attention_is_zero_and_padding_queries_do_not_count():
    centres = token_centres((3, 5), (16.0, 16.0))
    assert torch.allclose(centres[6], torch.tensor([24.0, 24.0], dtype=torch.float64))
    eye = torch.eye(15).expand(2, 4, 15, 15)
    assert torch.all(mean_attention_distance(eye, centres) == 0)
    with_cls = torch.eye(16).expand(2, 4, 16, 16)  # a class token in front is left out
    geom = LayerGeometry("l", grid=(3, 5), spacing=(16.0, 16.0), prefix=1)
    assert torch.all(layer_distance(with_cls, geom) == 0)
    # A 3x3 grid in 2x2 windows (padded to 4x4): 3 of window (0, 1)'s queries are padding; a
    # real query attending uniformly to its 2 real keys 8 px apart has distance 4, and the
    # padding queries (attending anywhere) must not change the mean.
    probs = torch.zeros(4, 1, 4, 4)
    probs[:, 0] = torch.eye(4)
    probs[1, 0, 0] = torch.tensor([0.5, 0, 0.5, 0])  # window (0, 1): tokens (0,2) and (1,2)
    probs[1, 0, 1] = torch.tensor([1.0, 0, 0, 0])  # a padding query looking away
    geom = LayerGeometry("w", grid=(3, 3), spacing=(8.0, 8.0), window=(2, 2))
    expected = 4.0 / 9  # 9 real queries: one at 4 px, the rest at 0
    assert torch.allclose(layer_distance(probs, geom), torch.tensor([expected], dtype=torch.float64))


# ---------------------------------------------------------------------------------- rollout
def test_rollout_rows_sum_to_one_and_equal_the_explicit_product():
    model = _vit()
    x = torch.randn(3, 3, 16, 16)
    res = attention_rollout(model, x, "cls")
    r = res["rollout"]
    assert torch.allclose(r.sum(-1), torch.ones(3, 17, dtype=torch.float64), atol=1e-6)
    with torch.no_grad():  # the reference: each block's probabilities from attention_weights
        tokens = model._pos_embed(model.patch_embed(x), (4, 4))
        mats = []
        for block in model.blocks:
            p = block.attn.attention_weights(block.norm1(tokens)).double().mean(1)
            mats.append(0.5 * p + 0.5 * torch.eye(17, dtype=torch.float64))
            tokens = block(tokens)
    expected = mats[1] @ mats[0]
    assert torch.allclose(r, expected, atol=1e-6)
    assert torch.allclose(res["maps"], expected[:, 0, 1:].reshape(3, 4, 4))
    gap = attention_rollout(model, x, "gap")["maps"]
    assert torch.allclose(gap, expected[:, 1:, 1:].mean(1).reshape(3, 4, 4))
    with pytest.raises(ConfigError, match="class token"):
        attention_rollout(_vit(pool="gap", class_token=False), x, "cls")
    with pytest.raises(ConfigError, match="As-ViT"):
        attention_rollout(_asvit(32), torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------- ig
def test_ig_is_complete_and_equals_a_riemann_sum():
    model = _vit(img_size=8, width=16, depth=1, heads=1, mlp_dim=32)
    x = torch.randn(2, 3, 8, 8).clamp(-1, 1)
    res = integrated_gradients(model, x, target=3, baseline="black", steps=64, internal_batch_size=128)
    assert torch.all(res["gap"] <= 1e-3 * res["delta_f"].abs())
    steps, base = 128, torch.full_like(x, -1.0)  # midpoint Riemann sum of the path gradients
    alphas = ((torch.arange(steps) + 0.5) / steps)[:, None, None, None, None]
    path = (base + alphas * (x - base)).reshape(-1, 3, 8, 8).requires_grad_()
    grads = torch.autograd.grad(model(path)[:, 3].sum(), path)[0]
    ref = grads.reshape(steps, *x.shape).mean(0) * (x - base)
    assert (res["attributions"] - ref).abs().max() <= 1e-3 * ref.abs().max()
    blur = integrated_gradients(model, x, baseline="blur", steps=64, internal_batch_size=128)
    assert torch.equal(blur["target"], model(x).argmax(-1))
    assert torch.all(blur["relative_gap"] <= 1e-3)


# ---------------------------------------------------------------------------------- embeddings
def test_filter_pca_equals_numpy_svd_and_posemb_similarity():
    model = _vit(patch=4)
    kernels = model.patch_embed.proj.weight.detach()
    res = filter_components(kernels, k=5)
    x = kernels.double().reshape(32, -1).numpy()
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    comps = res["components"].reshape(5, -1).numpy()
    signs = np.sign((comps * vt[:5]).sum(1))
    assert np.allclose(comps * signs[:, None], vt[:5], atol=1e-10)
    assert np.allclose(res["explained"].numpy(), (s**2 / (s**2).sum())[:5])
    table, grid, kind = position_table(_vit(posemb="learn"))
    assert kind == "learned" and grid == (4, 4) and table.shape == (16, 32)
    t = table.double().numpy()
    ref = t @ t.T / np.outer(np.linalg.norm(t, axis=1), np.linalg.norm(t, axis=1))
    assert np.allclose(posemb_similarity(table).numpy(), ref)
    assert position_table(_vit(posemb="sincos2d"))[2] == "fixed sin-cos"
    with pytest.raises(ConfigError, match="no position embedding"):
        position_table(_asvit(32))


# ---------------------------------------------------------------------------------- corruptions
def test_corruptions_follow_their_definitions():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 0.5 + 0.25
    for s, c in enumerate((0.4, 0.3, 0.2, 0.1, 0.05), start=1):
        out = corrupt(img, "contrast", s)
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(out, (img - mean) * c + mean, atol=1e-7)
    grey = torch.full((4, 3, 32, 32), 0.5)
    assert abs(float((corrupt(grey, "gaussian_noise", 1) - grey).std()) - 0.08) < 0.002
    assert torch.allclose(corrupt(grey, "gaussian_blur", 5), grey)  # a constant stays constant
    smooth = torch.linspace(0.2, 0.8, 32).expand(2, 3, 32, 32)
    jpeg = corrupt(smooth, "jpeg", 5)  # 8-bit output, close on a smooth ramp but not equal
    assert torch.allclose(jpeg * 255, (jpeg * 255).round(), atol=1e-4)
    assert 0 < (jpeg - smooth).abs().mean() < 0.05
    assert torch.equal(corrupt(img, "jpeg", 0), img)
    with pytest.raises(ConfigError, match="unknown corruption"):
        corrupt(img, "fog", 1)
    model = _vit()
    x, y = torch.rand(6, 3, 16, 16) * 2 - 1, torch.arange(6)
    res = robustness(model, x, y, 10)
    with torch.no_grad():
        assert res["clean"]["accuracy"] == float((model(x).argmax(-1) == y).double().mean())
    assert [len(v) for v in res["corruptions"].values()] == [5] * 4


# ---------------------------------------------------------------------------------- CLI
def test_analyze_cli_on_the_digits_model(digits_teacher, tmp_path, capsys):
    run, _ = digits_teacher
    out = tmp_path / "an"
    assert main(["analyze", str(run), "--data", "digits", "--images", "4", "--robust-images",
                 "8", "--ig-steps", "4", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["skipped"] == {}
    for name in ("filters", "posemb", "distance", "rollout", "ig", "robustness"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.json").is_file()
    dist = doc["distance"]  # 2 layers of 4 heads, pixels of the 16 px input (diagonal 22.6)
    assert len(dist) == 2 and all(len(h) == 4 for h in dist)
    assert all(0 < d < 16 * math.sqrt(2) for h in dist for d in h)
    # The paper's trend: later layers attend farther (2 layers here: no Spearman).
    assert doc["distance_summary"]["layer_mean"][1] > doc["distance_summary"]["layer_mean"][0]
    assert doc["posemb"]["kind"] == "learned" and doc["rollout"]["variant"] == "gap"
    assert doc["rollout"]["max_row_sum_error"] < 1e-6
    assert doc["robustness"]["n"] == 8


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    from vitscale.models import save

    assert main(["analyze", "nowhere", "--data", "digits", "--what", "filters,attn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown analysis" in err and "filters,posemb" in err
    save(_asvit(16), tmp_path / "asvit")
    assert main(["analyze", str(tmp_path / "asvit"), "--data", "digits", "--what", "posemb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no position embedding" in err
    # without --what the analyses that apply run, the others are noted
    model = _asvit(16)
    from vitscale.eval.api import eval_data

    res = analyze_model(model, eval_data(model, "digits"), ["filters"], out_dir=tmp_path / "a")
    assert res["filters"]["kernel"] == [3, 8, 8]
    with pytest.raises(ConfigError, match="rollout"):
        analyze_model(model, eval_data(model, "digits"), ["rollout"], out_dir=tmp_path / "a")


def test_window_attention_blocks_are_refused_and_global_ones_recorded():
    """A ViTDet-style model: its windowed blocks would record per-window maps, so asking for them
    is a one-line error; its global blocks record whole-image maps."""
    from vitscale.analysis import record_attention

    model = create_model("Ti/4", img_size=16, width=32, depth=2, heads=2, mlp_dim=64,
                         window_size=2, global_blocks=(1,)).eval()
    with pytest.raises(ConfigError, match=r"layer\(s\) \[0\] use window attention"):
        with record_attention(model):
            pass
    with record_attention(model, layers=[1]) as rec, torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert tuple(rec.probs[0][0].shape) == (2, 2, 17, 17)
