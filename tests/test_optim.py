"""Optimizers, param groups and schedules against independent references: timm's
AdafactorBigVision, torch.optim.AdamW, hand-written Adam loops and closed forms."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitscale.config import OptimConfig, ScheduleConfig
from vitscale.errors import ConfigError
from vitscale.models import create_model
from vitscale.optim import (
    AdafactorBV,
    AdamBF16,
    apply_lr,
    build_optimizer,
    param_groups,
    schedule_value,
    state_bytes,
)

# Factored (both of the two largest dims >= 32) and unfactored shapes, including >2-D tensors,
# a 32x32 tie, a scalar and a conv-like kernel whose second-largest dim is small.
SHAPES = [(64, 48), (48, 64), (32, 32), (20, 40), (40,), (), (4, 40, 36), (36, 5, 40), (16, 3, 4, 4)]
FACTORED = {(64, 48), (48, 64), (32, 32), (4, 40, 36), (36, 5, 40)}


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = 10 ** (3 * torch.rand((), generator=gen).item() - 2)  # 1e-2 .. 10
        out.append([scale * torch.randn(s, generator=gen) for s in SHAPES])
    return out


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
         lrs: list[float] | None = None) -> None:
    for i, step_grads in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _lrs(n: int) -> list[float]:
    return [1e-2 * (0.5 + 0.5 * math.cos(math.pi * i / n)) + 1e-3 for i in range(n)]


def _tiny_vit(**kw) -> nn.Module:
    return create_model("Ti/16", img_size=32, patch=8, depth=2, num_classes=10, **kw)


# ---------------------------------------------------------------------------------- AdafactorBV
@pytest.mark.parametrize("wd,clip", [(0.0, None), (0.1, None), (0.05, 1.0)])
def test_adafactor_matches_timm(wd, clip):
    import timm
    from timm.optim import AdafactorBigVision

    if clip and tuple(int(x) for x in timm.__version__.split(".")[:3]) < (1, 0, 31):
        # timm's update clipping divided by min(1, rms * clip) until pytorch-image-models#2790
        # (merged 2026-09); 1.0.31 is the first release seen with big_vision's max(1, rms / clip).
        pytest.skip(f"timm {timm.__version__} predates the AdafactorBigVision clipping fix")
    steps = 25
    grads, lrs = _grads(steps), _lrs(steps)
    ours, ref = _params(), _params()
    start = [p.detach().clone() for p in ours]
    # timm's default unscaled_wd=False decays by lr * wd, the convention AdafactorBV uses.
    opt = AdafactorBV(ours, lr=lrs[0], weight_decay=wd, momentum_dtype="float32",
                      clipping_threshold=clip)
    opt_ref = AdafactorBigVision(ref, lr=lrs[0], weight_decay=wd, min_dim_size_to_factor=32,
                                 momentum_dtype=torch.float32, clipping_threshold=clip)
    _run(opt, ours, grads, lrs)
    _run(opt_ref, ref, grads, lrs)
    for p, q, p0, shape in zip(ours, ref, start, SHAPES):
        assert (p - p0).abs().max() > 1e-2, shape  # the comparison below is not trivial
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {shape}")
        st, st_ref = opt.state[p], opt_ref.state[q]
        assert ("exp_avg_sq_r" in st) == (shape in FACTORED), shape
        assert ("exp_avg_sq_r" in st_ref) == (shape in FACTORED), shape
        torch.testing.assert_close(st["exp_avg"], st_ref["exp_avg"], rtol=1e-5, atol=1e-6)
        for key in ("exp_avg_sq", "exp_avg_sq_r", "exp_avg_sq_c"):
            if key in st_ref:
                torch.testing.assert_close(st[key], st_ref[key], rtol=1e-5, atol=0.0)


def test_adafactor_bf16_momentum_close_to_fp32():
    steps = 25
    grads, lrs = _grads(steps), _lrs(steps)
    runs = {}
    for dtype in ("bfloat16", "float32"):
        params = _params()
        opt = AdafactorBV(params, lr=lrs[0], momentum_dtype=dtype)
        _run(opt, params, grads, lrs)
        runs[dtype] = (params, opt)
    (p16, opt16), (p32, _) = runs["bfloat16"], runs["float32"]
    start = _params()
    for a, b, p0 in zip(p16, p32, start):
        assert opt16.state[a]["exp_avg"].dtype == torch.bfloat16
        moved = (b - p0).norm()
        rel = ((a - b).norm() / moved).item()
        assert 0 < rel < 1e-2, rel  # rounded, so not identical, but within bf16 precision


def test_adafactor_first_step_unfactored_closed_form():
    # t = 0: beta2 = 0, so v = g^2 + 1e-30, u = g / |g| = sign(g), m = 0.1 u, theta -= lr m.
    g = np.array([0.3, -2.0, 1e-3, -7.5, 40.0], dtype=np.float32)
    theta0 = np.array([1.0, -1.0, 0.5, 0.0, 2.0], dtype=np.float32)
    p = torch.tensor(theta0).requires_grad_()
    opt = AdafactorBV([p], lr=0.1)
    p.grad = torch.tensor(g)
    opt.step()
    expected = theta0 - 0.1 * 0.1 * np.sign(g)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-6, atol=1e-7)
    # The stored momentum is the bf16 rounding of 0.1 * sign(g); the update used the fp32 value.
    mom = opt.state[p]["exp_avg"]
    assert mom.dtype == torch.bfloat16
    np.testing.assert_array_equal(mom.float().numpy(),
                                  torch.tensor(0.1 * np.sign(g)).bfloat16().float().numpy())


def test_adafactor_second_step_unfactored_closed_form():
    # t = 1: beta2 = 1 - 2^-0.8; v = beta2 g0^2 + (1 - beta2) g1^2 (+eps), m = 0.09 u0 + 0.1 u1.
    rng = np.random.default_rng(0)
    g0, g1 = rng.normal(size=7), rng.normal(size=7) * 3
    theta0 = rng.normal(size=7)
    p = torch.tensor(theta0, dtype=torch.float32).requires_grad_()
    opt = AdafactorBV([p], lr=0.05, momentum_dtype="float32")
    for g in (g0, g1):
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    b2 = 1 - 2.0 ** -0.8
    u0 = g0 / np.sqrt(g0**2)
    u1 = g1 / np.sqrt(b2 * g0**2 + (1 - b2) * g1**2)
    m0 = 0.1 * u0
    m1 = 0.9 * m0 + 0.1 * u1
    expected = theta0 - 0.05 * m0 - 0.05 * m1
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_adafactor_first_step_factored_closed_form():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(64, 48)) * rng.uniform(0.1, 10.0, size=(64, 1))
    theta0 = rng.normal(size=(64, 48))
    p = torch.tensor(theta0, dtype=torch.float32).requires_grad_()
    opt = AdafactorBV([p], lr=0.1, momentum_dtype="float32")
    p.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    sq = g**2 + 1e-30
    r, c = sq.mean(axis=1), sq.mean(axis=0)  # row / column means of g^2
    v_hat = np.outer(r, c) / r.mean()
    expected = theta0 - 0.1 * 0.1 * g / np.sqrt(v_hat)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # Not the unfactored answer (sign(g)): the factorisation really was used.
    assert np.abs(expected - (theta0 - 0.01 * np.sign(g))).max() > 1e-3


def test_adafactor_update_clipping_closed_form():
    # At t = 0 an unfactored u = sign(g) has RMS 1, so threshold 0.5 halves it.
    g = torch.tensor([1.0, -3.0, 0.2, 5.0])
    p = torch.zeros(4, requires_grad=True)
    opt = AdafactorBV([p], lr=1.0, clipping_threshold=0.5, momentum_dtype="float32")
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * 0.5 * g.sign(), rtol=1e-6, atol=1e-7)


def test_adafactor_weight_decay_closed_form():
    # With zero gradients the update is 0, so only decoupled decay acts: theta_T = theta_0 *
    # prod_t (1 - lr_t * wd), with lr_t the group's lr at step t (not the base lr, not 1).
    steps, wd = 10, 0.3
    params = _params()
    start = [p.detach().clone() for p in params]
    lrs = _lrs(steps)
    opt = AdafactorBV(params, lr=lrs[0], weight_decay=wd)
    _run(opt, params, [[torch.zeros(s) for s in SHAPES]] * steps, lrs)
    factor = float(np.prod([1 - lr * wd for lr in lrs]))
    assert factor < 0.99
    for p, p0 in zip(params, start):
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [AdafactorBV, AdamBF16])
def test_state_dict_round_trip_keeps_bf16_and_resumes_exactly(cls):
    grads = _grads(8)
    params, resumed = _params(), _params()
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    _run(opt, params, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    json.dumps(saved["param_groups"])  # the checkpoint code writes groups as JSON
    with torch.no_grad():
        for q, p in zip(resumed, params):
            q.copy_(p)
    opt2 = cls(resumed, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved)
    assert all(opt2.state[q]["exp_avg"].dtype == torch.bfloat16 for q in resumed)
    _run(opt, params, grads[4:])
    _run(opt2, resumed, grads[4:])
    for p, q in zip(params, resumed):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- AdamBF16
def _adam_reference(params, grads, lrs, wd, betas=(0.9, 0.999), eps=1e-8, round_m=False):
    """Plain Adam with decoupled decay in float64; round_m keeps m in bf16 between steps."""
    b1, b2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for step, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            mi = b1 * m[i] + (1 - b1) * g
            m[i] = mi.to(torch.bfloat16).double() if round_m else mi
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = mi / (1 - b1**step), v[i] / (1 - b2**step)
            theta[i] = theta[i] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


def test_adam_fp32_momentum_equals_torch_adamw():
    steps, wd = 20, 0.1
    grads, lrs = _grads(steps), _lrs(steps)
    ours, ref = _params(), _params()
    opt = AdamBF16(ours, lr=lrs[0], weight_decay=wd, momentum_dtype="float32")
    opt_ref = torch.optim.AdamW(ref, lr=lrs[0], weight_decay=wd, foreach=False)
    _run(opt, ours, grads, lrs)
    _run(opt_ref, ref, grads, lrs)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], opt_ref.state[q]["exp_avg"])


def test_adam_bf16_momentum_against_reference_loops():
    steps, wd = 20, 0.05
    grads, lrs = _grads(steps), _lrs(steps)
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = AdamBF16(params, lr=lrs[0], weight_decay=wd)
    _run(opt, params, grads, lrs)
    exact = _adam_reference(start, grads, lrs, wd)
    emulated = _adam_reference(start, grads, lrs, wd, round_m=True)
    for p, p0, e, em in zip(params, start, exact, emulated):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
        moved = (e - p0.double()).norm()
        rel_exact = ((p.detach().double() - e).norm() / moved).item()
        rel_emulated = ((p.detach().double() - em).norm() / moved).item()
        assert 0 < rel_exact < 1e-2, rel_exact  # within bf16-momentum tolerance of fp32 Adam
        assert rel_emulated < 1e-4, rel_emulated  # and the same as Adam with m rounded to bf16


# ---------------------------------------------------------------------------------- state bytes
def _state_ratio(name: str, model: nn.Module) -> float:
    opt = build_optimizer(model, OptimConfig(name=name))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return state_bytes(opt) / sum(p.numel() * p.element_size() for p in model.parameters())


def test_state_bytes_per_optimizer():
    model = _tiny_vit()
    n = sum(p.numel() for p in model.parameters())
    # AdamW: two fp32 moments plus one 4-byte step tensor per parameter tensor.
    assert _state_ratio("adamw", model) == pytest.approx(2.0, abs=0.01)
    assert _state_ratio("adam_bf16", model) == 1.5  # bf16 m + fp32 v, step is a Python int
    assert _state_ratio("sgd", model) == 1.0  # one fp32 momentum buffer
    # AdafactorBV: bf16 momentum (exactly 0.5) + the second moment. Only the block matrices
    # (qkv 576x192, proj 192x192, fc1 768x192, fc2 192x768) are factored; the patch conv
    # (192x3x8x8: second-largest dim 8), pos_embed (1x17x192), head (10x192) and all vectors
    # keep a full fp32 second moment.
    factored = [(576, 192), (192, 192), (768, 192), (192, 768)] * 2
    factored_numel = sum(a * b for a, b in factored)
    second_moment = 4 * (n - factored_numel) + 4 * sum(a + b for a, b in factored)
    expected = (2 * n + second_moment) / (4 * n)
    ratio = _state_ratio("adafactor_bv", model)
    assert ratio == pytest.approx(expected, rel=1e-9)
    # This tiny model has 4% unfactored weights (mostly the patch conv); at ViT-B/16 scale the
    # ratio is ~0.51 (benchmarks/optimizer_memory.py).
    assert 0.5 < ratio < 0.6


# ---------------------------------------------------------------------------------- groups
def _groups_by_param(groups):
    return {name: g for g in groups for name in g["param_names"]}


def test_param_groups_decay_head_body_and_exclusions():
    model = _tiny_vit()
    cfg = OptimConfig(lr=0.1, weight_decay=0.03, head_weight_decay=3.0)
    groups = param_groups(model, cfg)
    by = _groups_by_param(groups)
    assert set(by) == {n for n, _ in model.named_parameters()}
    assert by["head.weight"]["weight_decay"] == 3.0
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"):
        assert by[name]["weight_decay"] == 0.03, name
    for name in ("head.bias", "pos_embed", "cls_token", "norm.weight", "norm.bias",
                 "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"):
        assert by[name]["weight_decay"] == 0.0, name
    assert all(g["lr_mult"] == 1.0 and g["lr"] == 0.1 for g in groups)
    # head_weight_decay None: the head decays like the body.
    by = _groups_by_param(param_groups(model, OptimConfig(weight_decay=0.03)))
    assert by["head.weight"]["weight_decay"] == 0.03


def test_param_groups_map_probe_frozen_and_decay_all():
    model = create_model("Ti/16", img_size=32, patch=8, depth=1, num_classes=10, pool="map")
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    by = _groups_by_param(param_groups(model, OptimConfig(weight_decay=0.1)))
    assert by["attn_pool.latent"]["weight_decay"] == 0.0
    assert by["attn_pool.q.weight"]["weight_decay"] == 0.1
    assert "blocks.0.attn.qkv.weight" not in by  # frozen: left out
    by = _groups_by_param(param_groups(model, OptimConfig(weight_decay=0.1, head_weight_decay=1.0,
                                                          decay_norms_and_biases=True)))
    assert by["attn_pool.latent"]["weight_decay"] == 0.1
    assert by["norm.weight"]["weight_decay"] == 0.1
    assert by["head.weight"]["weight_decay"] == 1.0


def test_param_groups_lr_mults_first_match_and_apply_lr():
    model = _tiny_vit()
    cfg = OptimConfig(lr=1.0, lr_mults={r"^head\.": 10.0, r"blocks\.0\.": 0.1, r"blocks": 0.5})
    opt = build_optimizer(model, cfg)
    by = _groups_by_param(opt.param_groups)
    assert by["head.weight"]["lr_mult"] == 10.0
    assert by["head.bias"]["lr_mult"] == 10.0
    assert by["blocks.0.mlp.fc1.weight"]["lr_mult"] == 0.1  # first match wins over "blocks"
    assert by["blocks.1.mlp.fc1.weight"]["lr_mult"] == 0.5
    assert by["pos_embed"]["lr_mult"] == 1.0
    sched = ScheduleConfig(decay="constant", warmup_steps=10)
    lr = apply_lr(opt, 5, 100, 2e-3, sched)
    assert lr == pytest.approx(1e-3)
    assert by["head.weight"]["lr"] == pytest.approx(1e-2)
    assert by["blocks.0.norm1.bias"]["lr"] == pytest.approx(1e-4)
    assert by["pos_embed"]["lr"] == pytest.approx(1e-3)


def test_param_groups_errors():
    model = _tiny_vit()
    with pytest.raises(ConfigError, match="lr_mults.*regex"):
        param_groups(model, OptimConfig(lr_mults={"blocks.(": 0.1}))
    with pytest.raises(ConfigError, match="adamw, adam_bf16, adafactor_bv, sgd"):
        build_optimizer(model, OptimConfig(name="lamb"))


def test_build_optimizer_kinds():
    model = _tiny_vit()
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and not sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimConfig(name="adam_bf16")), AdamBF16)
    ada = build_optimizer(model, OptimConfig(name="adafactor_bv", momentum=0.95))
    assert isinstance(ada, AdafactorBV)
    assert ada.param_groups[0]["momentum"] == 0.95
    assert ada.param_groups[0]["min_dim_size_to_factor"] == 32


# ---------------------------------------------------------------------------------- schedules
def test_warmup_is_linear():
    cfg = ScheduleConfig(decay="constant", warmup_steps=10)
    assert [schedule_value(s, 100, cfg) for s in range(12)] == pytest.approx(
        [s / 10 for s in range(11)] + [1.0])


def test_cosine_and_linear():
    cfg = ScheduleConfig(decay="cosine", warmup_steps=10)
    assert schedule_value(10, 110, cfg) == pytest.approx(1.0)
    assert schedule_value(60, 110, cfg) == pytest.approx(0.5)
    assert schedule_value(35, 110, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule_value(110, 110, cfg) == pytest.approx(0.0)
    cfg = ScheduleConfig(decay="cosine", end_lr_fraction=0.1)
    assert schedule_value(50, 100, cfg) == pytest.approx(0.55)
    assert schedule_value(100, 100, cfg) == pytest.approx(0.1)
    cfg = ScheduleConfig(decay="linear", end_lr_fraction=0.2)
    assert schedule_value(25, 100, cfg) == pytest.approx(0.8)


def test_rsqrt_and_cooldown():
    cfg = ScheduleConfig(decay="rsqrt", warmup_steps=100, timescale=50, cooldown_steps=100)
    total = 1000
    assert schedule_value(50, total, cfg) == pytest.approx(0.5)  # warmup: 50/100 * 1
    assert schedule_value(100, total, cfg) == pytest.approx(1.0)
    assert schedule_value(150, total, cfg) == pytest.approx(1 / math.sqrt(2))
    assert schedule_value(250, total, cfg) == pytest.approx(0.5)
    # Cooldown (as big_vision): min(1, (T - t) / c), so 1/c at the last update t = T - 1 and 0 at T.
    base_900 = 1 / math.sqrt(1 + 800 / 50)
    assert schedule_value(900, total, cfg) == pytest.approx(base_900)
    assert schedule_value(950, total, cfg) == pytest.approx(0.5 / math.sqrt(1 + 850 / 50))
    assert schedule_value(total - 1, total, cfg) == pytest.approx(0.01 / math.sqrt(1 + 899 / 50))
    assert schedule_value(total, total, cfg) == 0.0


def test_warmup_fraction_and_errors():
    cfg = ScheduleConfig(decay="constant", warmup_fraction=0.1)
    assert schedule_value(10, 200, cfg) == pytest.approx(0.5)  # 20 warmup steps
    assert schedule_value(20, 200, cfg) == pytest.approx(1.0)
    cfg = ScheduleConfig(decay="constant", warmup_fraction=0.1, warmup_steps=40)
    assert schedule_value(20, 200, cfg) == pytest.approx(0.5)  # warmup_steps wins
    with pytest.raises(ConfigError, match="schedule.decay"):
        schedule_value(0, 10, ScheduleConfig(decay="step"))
