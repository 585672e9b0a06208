"""Tensor parallelism (parallel/tp.py): check_tp's one-line errors (no processes), then TP = 2
on CPU with gloo against one-process runs of the same models (tests/tp_worker.py: forward,
loss, every gradient, state dict, checkpoints), and the exact collectives per block. FSDP2 x TP
through the trainer: tests/test_parallel.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vitscale.errors import UserError
from vitscale.models.config import ModelConfig
from vitscale.models.vit import VisionTransformer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TINY = dict(img_size=16, patch=4, width=64, depth=1, heads=4, mlp_dim=128, num_classes=10)


def vit(**settings) -> VisionTransformer:
    return VisionTransformer(ModelConfig(**{**TINY, **settings}))


def one_line_error(model, tp: int, sp: bool = False, **kwargs) -> str:
    from vitscale.parallel.tp import check_tp

    with pytest.raises(UserError) as info:
        check_tp(model, tp, sp, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_num_tokens_counts_the_class_token():
    from vitscale.parallel.tp import num_tokens

    assert num_tokens(vit(pool="token")) == 17
    assert num_tokens(vit(pool="map")) == 16
    assert num_tokens(vit(pool="gap", class_token=True)) == 17
    assert num_tokens(vit(img_size=256, patch=16, pool="token")) == 257


def test_check_tp_accepts_what_the_plan_shards():
    from vitscale.parallel.tp import check_tp

    check_tp(vit(pool="map"), 4, True)
    check_tp(vit(pool="token"), 2, False)  # 17 tokens: fine without SP
    check_tp(vit(pool="gap"), 2, True, dp_shard=4)


def test_check_tp_one_line_errors():
    message = one_line_error(vit(heads=4, width=96, mlp_dim=192), 3)
    assert "model.heads=4" in message and "parallel.tp=3" in message
    assert "one of [1, 2, 4]" in message
    assert "one of [1, 2, 4]" in one_line_error(vit(heads=4), 8)
    assert "model.mlp_dim=129" in one_line_error(vit(heads=4, mlp_dim=129), 2)
    assert "map_mlp_dim=66" in one_line_error(vit(pool="map", map_mlp_dim=66), 4)
    assert "the MAP head's" in one_line_error(vit(pool="map", heads=4), 8)
    # 16 x 16 patches + a class token.
    message = one_line_error(vit(img_size=256, patch=16, pool="token"), 2, sp=True)
    assert "a class token makes 257 tokens" in message
    assert "model.pool=gap or map without a class token" in message
    assert "parallel.sequence_parallel=false" in message
    assert "15 patches of 4x4" in one_line_error(vit(img_size=(12, 20), patch=4, pool="gap"), 2,
                                              sp=True)
    assert "parallel.dp_shard=3" in one_line_error(vit(pool="gap"), 2, dp_shard=3)
    assert "must be >= 1" in one_line_error(vit(), 0)


def test_check_tp_refuses_hybrid_and_asvit():
    from vitscale.models.asvit import AsViT, asvit_config

    hybrid = vit(stem="hybrid", hybrid_layers=(), hybrid_width=32)
    message = one_line_error(hybrid, 2)
    assert "not supported for a hybrid ResNet stem" in message and "parallel.dp_shard (FSDP)" in message
    asvit = AsViT(asvit_config("asvit-seed", img_size=32, num_classes=10))
    message = one_line_error(asvit, 2)
    assert "not supported for As-ViT" in message and "parallel.dp_shard (FSDP)" in message
    assert "VisionTransformer models only" in one_line_error(torch.nn.Linear(2, 2), 2)


# ---------------------------------------------------------------------------------- processes
def spawn(which: str, world: int, monkeypatch) -> dict:
    import torch.multiprocessing as mp

    import tp_worker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + str(Path(out) / "init")
        mp.spawn(tp_worker.main, args=(world, init, out, which, 300), nprocs=world)
        return json.loads((Path(out) / "result.json").read_text())


def expected_block(settings: dict, sp: bool) -> dict[str, dict[str, int]]:
    """The collectives of one block (parallel/tp.py's table), and the small ones that reduce
    the gradients of replicated parameters used on sharded activations."""
    parallel = settings.get("block") == "parallel"
    fwd = {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1} if sp else {"all_reduce": 1}
    if not parallel:
        fwd = {k: 2 * v for k, v in fwd.items()}
    bwd = dict(fwd)
    per_norm = 2 if settings.get("norm_bias", True) else 1  # weight (+ bias)
    ar = (2 * per_norm if settings.get("qk_norm") else 0) + \
        ((1 if parallel else 2) * per_norm if sp else 0)
    if ar:
        bwd["all_reduce"] = bwd.get("all_reduce", 0) + ar
    if settings.get("qkv_bias", True):
        bwd["all_gather_into_tensor"] = bwd.get("all_gather_into_tensor", 0) + 1
    return {"forward": fwd, "backward": bwd}


def test_tp2_matches_one_process(monkeypatch):
    """TP = 2, each rank against the one-process run (the worker raises on any difference above
    1e-5 in forward, loss, a gradient, a state-dict tensor; DCP round trips; meta builds)."""
    import tp_worker

    result = spawn("tp2", 2, monkeypatch)
    table = {}
    for name, (settings, sp) in tp_worker.VARIANTS.items():
        got = result[name]["per_block"]
        want = expected_block(settings, sp)
        assert got == want, f"{name}: {got} != {want}"
        table[name] = got
    # The activation collectives of the parallel block: one reduction forward, one backward.
    assert table["parallel"]["forward"] == {"all_reduce": 1}
    assert table["parallel_sp"]["forward"] == {"all_gather_into_tensor": 1,
                                               "reduce_scatter_tensor": 1}
    assert table["sequential"]["forward"] == {"all_reduce": 2}
    assert table["sequential_sp"]["forward"] == {"all_gather_into_tensor": 2,
                                                 "reduce_scatter_tensor": 2}
    # vitscale.plan's activations per rank under TP 2 (and SP): what autograd saves there.
    from vitscale.plan import activation_bytes

    for name, (settings, sp) in tp_worker.VARIANTS.items():
        cfg = ModelConfig(**{**tp_worker.TINY, **settings})
        predicted = activation_bytes(cfg, 4, (16, 16), "fp32", kernel="flash", tp=2, sp=sp,
                                     device="cpu").saved
        got = result["saved"][name]
        assert abs(predicted / got - 1) < 0.10, (name, predicted, got)
    # parallel/tp.py's docstring describes DTensor's own dropout on CPU as measured here.
    assert result["dropout_dtensor"] == {"replicate_same_on_ranks": True,
                                         "shard_masks_differ": False, "global_rng_moved": True}


