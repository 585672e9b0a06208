"""Optimizers, param groups and schedules against independent references: optax (big_vision's
Adafactor chain rebuilt from optax's parts, optax's Adam with a bf16 first moment), timm's
AdafactorBigVision, torch.optim.AdamW, hand-written Adam loops and closed forms."""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitscale.config import OptimConfig, ScheduleConfig
from vitscale.errors import CheckpointError, ConfigError
from vitscale.models import create_model
from vitscale.models.bigvision import write_npz
from vitscale.optim import (
    AdafactorBV,
    AdamBF16,
    apply_lr,
    build_optimizer,
    factor_view,
    factor_views,
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


# ---------------------------------------------------------------------------------- optax references
@functools.cache
def _compiled(make_txs):
    """`run(params, grads, *args)`: {name: (final params, final state)} of each optax
    transformation in `make_txs(*args)` after one update per gradient (grads stacked on axis 0),
    all in one program, compiled once per argument shapes.

    XLA's excess precision is off: by default XLA keeps a bf16 product such as optax's b1 * m in
    fp32 under jit, which is not the bf16 arithmetic the optax program states (and computes op by
    op). Optimization level 0 only makes compiling twice as fast."""
    import jax
    import optax

    def run(params, grads, *args):
        out = {}
        for name, tx in make_txs(*args).items():
            def body(carry, g, tx=tx):
                p, s = carry
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            out[name] = jax.lax.scan(body, (params, tx.init(params)), grads)[0]
        return out

    return jax.jit(run, compiler_options={"xla_allow_excess_precision": False,
                                          "xla_backend_optimization_level": 0})


def _big_vision_make(opt, sched, base_lr, wd, wd_mults=((1.0, None),), lr_mults=()):
    """big_vision's `optax.make` around the optimizer `opt`: x lr, x lr_mult (masked), + wd * mult
    * theta (decoupled, masked), x schedule s(t) (sched[count]), x -1."""
    import optax

    return optax.chain(opt, optax.scale(base_lr),
                       *(optax.masked(optax.scale(mult), mask) for mult, mask in lr_mults),
                       *(optax.add_decayed_weights(wd * mult, mask) for mult, mask in wd_mults),
                       optax.scale_by_schedule(lambda count: sched[count]), optax.scale(-1.0))


def _big_vision_adafactor(momentum_dtype, min_dim_size_to_factor, clip):
    """big_vision/optax.py `scale_by_adafactor` with its defaults, from optax's parts (clip = inf
    is no clipping: u / max(1, rms / inf) = u)."""
    import jax.numpy as jnp
    import optax

    def beta2(count, decay_rate):
        return jnp.minimum(0.999, 1.0 - (jnp.asarray(count, jnp.float32) + 1.0) ** -decay_rate)

    return optax.chain(
        optax.scale_by_factored_rms(factored=True, decay_rate=0.8, step_offset=0,
                                    min_dim_size_to_factor=min_dim_size_to_factor, epsilon=1e-30,
                                    decay_rate_fn=beta2),
        optax.clip_by_block_rms(clip),
        optax.ema(0.9, debias=False, accumulator_dtype=jnp.dtype(momentum_dtype)))


def _shape_chains(sched, base_lr, wd, clip):
    """big_vision's Adafactor and optax's Adam, first moment in bf16 and in fp32."""
    import jax.numpy as jnp
    import optax

    out = {}
    for dtype in ("bfloat16", "float32"):
        out["adafactor", dtype] = _big_vision_make(_big_vision_adafactor(dtype, 32, clip), sched,
                                                   base_lr, wd)
        out["adam", dtype] = _big_vision_make(optax.scale_by_adam(mu_dtype=jnp.dtype(dtype)), sched,
                                              base_lr, wd)
    return out


SHAPE_STEPS, BASE_LR = 25, 0.01


@functools.cache
def _optax_on_shapes(wd, clip):
    """The optax references on _params() with _grads(25) and lr _lrs(25); wd is vitscale's (big_vision's
    is wd * base lr), clip Adafactor's update clipping (Adam has none)."""
    grads = _grads(SHAPE_STEPS)
    stacked = [np.stack([step[i].numpy() for step in grads]) for i in range(len(SHAPES))]
    sched = np.asarray(_lrs(SHAPE_STEPS), np.float32) / BASE_LR
    start = [p.detach().numpy() for p in _params()]
    return _compiled(_shape_chains)(start, stacked, sched, BASE_LR, wd * BASE_LR,
                                    np.inf if clip is None else clip)


def _np(t):
    return t.detach().float().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float32)


def _assert_matches(ours, ref, dtype, what, scale=None):
    """A tensor against optax's. With an fp32 first moment, to rounding. With a bf16 one, a last-bit
    fp32 difference upstream (reduction order, rsqrt) now and then rounds a moment entry the other
    way, one bf16 step (2^-8 relative), which the later steps carry: so at most 1% of the entries
    off by more than rounding, and none by more than `scale` (for moments: one bf16 step of the
    largest entry). Before the fix (0.9 where optax multiplies by bf16(0.9) = 0.8984375) nearly
    every entry was off, by up to 3% of the largest moment and 1e-3 in the parameters."""
    ours, ref = _np(ours), _np(ref)
    if dtype == "float32":
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6, err_msg=what)
        return
    diff = np.abs(ours - ref)
    off = (diff > 1e-6 + 1e-6 * np.abs(ref)).mean()
    assert off <= 0.01, f"{what}: {off:.1%} of the entries differ"
    assert diff.max() <= (2**-8 * np.abs(ref).max() if scale is None else scale), f"{what}: {diff.max():.2e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adafactor_matches_big_vision_optax(dtype):
    # big_vision's chain on the same gradients, lr varying, with and without weight decay and
    # update clipping: parameters, momentum and second-moment statistics.
    grads, lrs = _grads(SHAPE_STEPS), _lrs(SHAPE_STEPS)
    for wd, clip in [(0.0, None), (0.3, None), (0.1, 1.0)]:
        ours = _params()
        opt = AdafactorBV(ours, lr=lrs[0], weight_decay=wd, momentum_dtype=dtype,
                          clipping_threshold=clip)
        _run(opt, ours, grads, lrs)
        ref, ((rms, _, mom), *_) = _optax_on_shapes(wd, clip)["adafactor", dtype]
        for i, (p, p0, shape) in enumerate(zip(ours, _params(), SHAPES)):
            what = f"{shape}, wd {wd}, clip {clip}"
            assert (p - p0).abs().max() > 1e-2, what  # the comparison is not trivial
            _assert_matches(p, ref[i], dtype, f"param {what}", scale=5e-4)
            st = opt.state[p]
            assert st["exp_avg"].dtype == getattr(torch, dtype)
            _assert_matches(st["exp_avg"], mom.ema[i], dtype, f"momentum {what}")
            assert ("exp_avg_sq_r" in st) == (shape in FACTORED), shape
            pairs = ([(st["exp_avg_sq_r"], rms.v_row[i]), (st["exp_avg_sq_c"], rms.v_col[i])]
                     if shape in FACTORED else [(st["exp_avg_sq"], rms.v[i])])
            for stat, ref_stat in pairs:  # keepdim here, the axis removed in optax
                np.testing.assert_allclose(_np(stat).reshape(ref_stat.shape), ref_stat, rtol=1e-5,
                                           atol=0, err_msg=what)


def _big_vision_arrays(model, tensors, tmp_path):
    """Parameter-shaped vitscale tensors (weights, gradients, moments) under big_vision's names and
    in its layouts, through the npz writer."""
    path = write_npz(model.cfg, tensors, tmp_path / "t.npz", layout="big_vision")
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _big_vision_names(model, tmp_path):
    """vitscale parameter name -> its big_vision names in order (query, key, value for qkv), read
    off the writer by writing every tensor filled with its own index."""
    names = [n for n, _ in model.named_parameters()]
    marked = {n: torch.full(p.shape, float(i)) for i, (n, p) in enumerate(model.named_parameters())}
    out = defaultdict(list)
    for key, array in _big_vision_arrays(model, marked, tmp_path).items():
        out[names[int(array.flat[0])]].append(key)
    return out


def test_adafactor_vit_matches_big_vision_kernels(tmp_path):
    # big_vision's Adafactor on big_vision's ViT kernels (q, k, v (D, H, hd), out (H, hd, D)) and
    # adafactor_bv on vitscale's fused qkv / proj, same gradients, schedule, head decay and
    # head lr_mult. Width 64, 8 heads, factored from 8: heads == head_dim ties, and the (8, 8)
    # q / k / v biases are factored too. Without the head lr_mult, before the fix the attention
    # tensors were 6e-3 apart after 5 steps, every other tensor 1e-7 (now all 1e-7). fp32
    # momentum, to compare to rounding.
    steps, min_dim = 5, 8
    torch.manual_seed(0)
    model = create_model("Ti/16", img_size=16, patch=4, depth=2, num_classes=10, width=64, heads=8,
                         mlp_dim=96, pool="map")
    cfg = OptimConfig(name="adafactor_bv", lr=0.01, weight_decay=0.1, head_weight_decay=1.0,
                      lr_mults={r"^head\.": 10.0})
    opt = build_optimizer(model, cfg)
    for group in opt.param_groups:
        group.update(momentum_dtype="float32", min_dim_size_to_factor=min_dim)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    grads = [{n: 10 ** (2 * torch.rand((), generator=gen).item() - 1) * torch.randn(p.shape, generator=gen)
              for n, p in params.items()} for _ in range(steps)]
    sched = []
    for step, step_grads in enumerate(grads):
        sched.append(apply_lr(opt, step, steps, cfg.lr, ScheduleConfig()) / cfg.lr)
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()

    bv = functools.partial(_big_vision_arrays, model, tmp_path=tmp_path)
    bv_start, bv_grads = bv(start), [bv(g) for g in grads]
    keys = list(bv_start)

    def make_txs(sched):
        adafactor = _big_vision_adafactor("float32", min_dim, np.inf)
        return {"bv": _big_vision_make(
            adafactor, sched, cfg.lr, cfg.lr, lr_mults=[(10.0, {k: k.startswith("head/") for k in keys})],
            wd_mults=[(0.1, {k: k.endswith("/kernel") and k != "head/kernel" for k in keys}),
                      (1.0, {k: k == "head/kernel" for k in keys})])}

    ref, ((rms, _, mom), *_) = _compiled(make_txs)(
        bv_start, {k: np.stack([g[k] for g in bv_grads]) for k in keys}, np.float32(sched))["bv"]
    ours, ours_mom = bv(params), bv({n: opt.state[p]["exp_avg"] for n, p in params.items()})
    ours_v = bv({n: opt.state[p].get("exp_avg_sq", torch.zeros(p.shape)) for n, p in params.items()})
    factored = set()
    for name, names in _big_vision_names(model, tmp_path).items():
        state = opt.state[params[name]]
        for j, k in enumerate(names):
            assert np.abs(ours[k] - bv_start[k]).max() > 1e-3, k  # every tensor moved
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(ours_mom[k], mom.ema[k], rtol=1e-5, atol=1e-7, err_msg=k)
            if rms.v[k].shape == ref[k].shape:  # big_vision keeps a full second moment
                assert "exp_avg_sq" in state, k
                np.testing.assert_allclose(ours_v[k], rms.v[k], rtol=1e-5, atol=0, err_msg=k)
                continue
            factored.add(k)
            # Row / column statistics of the j-th kernel (q, k, v are stacked on axis 0).
            for key, ref_stat in (("exp_avg_sq_r", rms.v_row[k]), ("exp_avg_sq_c", rms.v_col[k])):
                stat = np.split(_np(state[key]), len(names))[j]
                np.testing.assert_allclose(stat.reshape(ref_stat.shape), ref_stat, rtol=1e-5, atol=0,
                                           err_msg=f"{key} {k}")
    attention = {k for k in keys if "/MultiHeadDotProductAttention_0/" in k and "/out/bias" not in k}
    assert attention <= factored  # kernels and q / k / v biases: the tie-breaks were exercised


@pytest.mark.parametrize("width,heads,min_dim", [(64, 4, 32), (64, 1, 32), (96, 3, 32), (64, 8, 8),
                                                 (128, 2, 32)])
def test_adafactor_state_shapes_match_optax(width, heads, min_dim, tmp_path):
    # The factoring of every tensor against optax's on big_vision's tensors (jax.eval_shape: no
    # compiling): which are factored, and the shapes of the row and column statistics. (64, 4):
    # the (64, 4, 16) q / k / v kernels are not factored in big_vision (the fused (192, 64) was);
    # (64, 1): D == head_dim ties, so the rows are the head_dim axis.
    import jax
    import optax

    model = create_model("Ti/16", img_size=16, patch=4, depth=1, num_classes=10, width=width,
                         heads=heads, mlp_dim=96, pool="map")
    opt = build_optimizer(model, OptimConfig(name="adafactor_bv"))
    for group in opt.param_groups:
        group["min_dim_size_to_factor"] = min_dim
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    bv_params = _big_vision_arrays(model, params, tmp_path)
    ref = jax.eval_shape(optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim).init, bv_params)
    for name, names in _big_vision_names(model, tmp_path).items():
        state = opt.state[params[name]]
        for k in names:
            if ref.v[k].shape == bv_params[k].shape:
                assert "exp_avg_sq" in state, k
                continue
            for key, ref_stat in (("exp_avg_sq_r", ref.v_row[k]), ("exp_avg_sq_c", ref.v_col[k])):
                # Ours keep the averaged axis (size 1), optax drops it; q, k, v stacked on axis 0.
                mine = tuple(state[key].shape)
                mine = mine[1:] if len(mine) > bv_params[k].ndim else mine
                dropped = {mine[:i] + mine[i + 1:] for i, size in enumerate(mine) if size == 1}
                assert ref_stat.shape in dropped, (k, key, mine, ref_stat.shape)


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


def test_factor_views_of_vit_map_head_and_asvit():
    model = create_model("Ti/16", img_size=32, patch=8, depth=1, num_classes=10, pool="map")
    views = factor_views(model)
    assert sorted(views) == sorted(
        [f"blocks.0.attn.{n}" for n in ("qkv.weight", "qkv.bias", "proj.weight")]
        + [f"attn_pool.{n}" for n in ("q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight")])
    assert views["blocks.0.attn.qkv.weight"] == factor_view((3, 3, 64, 192), (0, 3, 1, 2), stacked=1)
    assert views["attn_pool.kv.bias"] == factor_view((2, 3, 64), (0, 1, 2), stacked=1)
    assert views["attn_pool.proj.weight"] == factor_view((192, 3, 64), (1, 2, 0))
    # As-ViT's window attention: the same per-head kernels. Stage 4 (width 128, 8 heads of 16):
    # the (128, 8, 16) q / k / v kernels are too small to factor; the fused (384, 128) would be.
    asvit = create_model("asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16", num_classes=10, img_size=32)
    opt = build_optimizer(asvit, OptimConfig(name="adafactor_bv"))
    for p in asvit.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    qkv = dict(asvit.named_parameters())["stages.3.0.attn.qkv.weight"]
    assert qkv.shape == (384, 128) and "exp_avg_sq_r" not in opt.state[qkv]
    proj = dict(asvit.named_parameters())["stages.3.0.attn.proj.weight"]
    assert opt.state[proj]["exp_avg_sq"].shape == (128, 128)


def _vit_steps(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_adafactor_vit_checkpoint_resumes_exactly_and_refuses_old_statistics(tmp_path):
    from vitscale.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = OptimConfig(name="adafactor_bv", weight_decay=0.1)
    model, resumed = (_tiny_vit(width=128, heads=2, mlp_dim=128) for _ in range(2))
    opt = build_optimizer(model, cfg)
    _vit_steps(model, opt, 2)
    path = save_checkpoint(tmp_path / "run", 2, model, opt, {})  # param groups through JSON
    opt2 = build_optimizer(resumed, cfg)
    load_checkpoint(path, resumed, opt2)
    # The views are the model's, kept by load_state_dict; the statistics per head.
    assert [g["factor_views"] for g in opt2.param_groups] == [g["factor_views"] for g in opt.param_groups]
    assert opt2.state[resumed.blocks[0].attn.qkv.weight]["exp_avg_sq_r"].shape == (3, 1, 2, 64)
    _vit_steps(model, opt, 2, seed=1)
    _vit_steps(resumed, opt2, 2, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    # An older vitscale factored the fused qkv (384, 128) as one matrix: statistics (1, 128) and
    # (384, 1), which cannot be turned into per-head ones. One line, naming the tensor and a fix.
    old = AdafactorBV([{k: v for k, v in g.items() if k != "factor_views"} for g in opt.param_groups])
    _vit_steps(model, old, 1)
    old_path = save_checkpoint(tmp_path / "old", 1, model, old, {})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight .*fresh optimizer") as err:
        load_checkpoint(old_path, resumed, build_optimizer(resumed, cfg))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["adafactor_bv", "adamw", "adam_bf16"])
def test_weight_decay_with_lr_mults_closed_form(name):
    # Zero gradients leave only the decay. adafactor_bv decays as big_vision, by the scheduled lr
    # without lr_mult: theta_T = theta_0 * prod_t (1 - lr_t * wd) whatever the multiplier, 0
    # included. adamw / adam_bf16 decay by the group's lr, lr_mult included (torch AdamW).
    steps, wd, head_wd = 6, 0.2, 0.5
    model = _tiny_vit()
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=wd, head_weight_decay=head_wd,
                      lr_mults={r"^head\.": 10.0, r"blocks\.0\.": 0.0})
    opt = build_optimizer(model, cfg)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = []
    for step in range(steps):
        lrs.append(apply_lr(opt, step, steps, cfg.lr, ScheduleConfig()))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    lrs = np.array(lrs)
    for n, p in model.named_parameters():
        mult = 10.0 if n.startswith("head.") else 0.0 if n.startswith("blocks.0.") else 1.0
        decay = head_wd if n == "head.weight" else wd if n.endswith(".weight") and p.ndim >= 2 else 0.0
        lr_decay = lrs if name == "adafactor_bv" else lrs * mult
        factor = float(np.prod(1 - lr_decay * decay))
        torch.testing.assert_close(p.detach(), start[n] * factor, rtol=1e-6, atol=1e-7, msg=n)
    assert float(np.prod(1 - lrs * wd)) < 0.97  # the decay is not negligible


def test_adafactor_lr_mult_scales_the_update_closed_form():
    # First step, unfactored head (10, 192): u = sign(g), m = 0.1 u, and
    # theta_1 = theta_0 * (1 - lr * wd) - lr * lr_mult * m: lr_mult on the update only.
    model = _tiny_vit()
    cfg = OptimConfig(name="adafactor_bv", lr=0.05, weight_decay=0.2, lr_mults={r"^head\.": 10.0})
    opt = build_optimizer(model, cfg)
    head = model.head.weight
    theta0 = head.detach().clone()
    lr = apply_lr(opt, 0, 10, cfg.lr, ScheduleConfig(decay="constant"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    expected = theta0 * (1 - lr * 0.2) - lr * 10.0 * 0.1 * head.grad.sign()
    torch.testing.assert_close(head.detach(), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- AdamBF16
def _adam_reference(params, grads, lrs, wd, betas=(0.9, 0.999), eps=1e-8):
    """Plain Adam with decoupled decay in float64."""
    b1, b2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for step, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**step), v[i] / (1 - b2**step)
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


def test_adam_bf16_momentum_close_to_float64_adam():
    steps, wd = 20, 0.05
    grads, lrs = _grads(steps), _lrs(steps)
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = AdamBF16(params, lr=lrs[0], weight_decay=wd)
    _run(opt, params, grads, lrs)
    exact = _adam_reference(start, grads, lrs, wd)
    for p, p0, e in zip(params, start, exact):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
        moved = (e - p0.double()).norm()
        rel = ((p.detach().double() - e).norm() / moved).item()
        assert 0 < rel < 1e-2, rel  # within bf16-momentum tolerance of Adam


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adam_matches_optax_scale_by_adam(dtype):
    # optax.scale_by_adam(mu_dtype=dtype) in big_vision's chain, lr varying, decoupled decay.
    grads, lrs, wd = _grads(SHAPE_STEPS), _lrs(SHAPE_STEPS), 0.3
    ours = _params()
    opt = AdamBF16(ours, lr=lrs[0], weight_decay=wd, momentum_dtype=dtype)
    _run(opt, ours, grads, lrs)
    ref, (adam, *_) = _optax_on_shapes(wd, None)["adam", dtype]
    for i, (p, p0, shape) in enumerate(zip(ours, _params(), SHAPES)):
        assert (p - p0).abs().max() > 1e-2, shape
        _assert_matches(p, ref[i], dtype, f"param {shape}", scale=5e-4)
        st = opt.state[p]
        assert st["exp_avg"].dtype == getattr(torch, dtype) and st["step"] == int(adam.count)
        _assert_matches(st["exp_avg"], adam.mu[i], dtype, f"first moment {shape}")
        np.testing.assert_allclose(_np(st["exp_avg_sq"]), adam.nu[i], rtol=1e-5, atol=0)


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
    # AdafactorBV: bf16 momentum (exactly 0.5) + the second moment. Factored, in big_vision's
    # layout (D 192, 3 heads of 64): the q, k, v kernels (192, 3, 64) with statistics (3, 64) and
    # (192, 3) each, the out kernel (3, 64, 192) with (3, 64) and (3, 192), fc1 768x192 and fc2
    # 192x768. The patch conv (192x3x8x8: second-largest dim 8), pos_embed (1x17x192), head
    # (10x192), the q / k / v biases (3, 64) and all vectors keep a full fp32 second moment.
    factored_numel = 2 * (576 * 192 + 192 * 192 + 2 * 768 * 192)
    stats = 2 * (3 * (3 * 64 + 192 * 3) + (3 * 64 + 3 * 192) + 2 * (768 + 192))
    second_moment = 4 * (n - factored_numel) + 4 * stats
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
    # The scheduled lr without the multiplier, which adafactor_bv decays by.
    assert by["head.weight"]["scheduled_lr"] == by["blocks.0.norm1.bias"]["scheduled_lr"] == lr


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
