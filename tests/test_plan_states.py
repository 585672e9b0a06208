"""vitscale.plan.states against the real tensors: the bytes of parameters, gradients and
optimizer state `model_state` predicts from shapes alone must equal, exactly and per rank, the
local bytes of the built model and of its optimizer after one step.

- In process: one process (what each DDP replica holds), every optimizer, two model shapes.
- One launch of four CPU gloo processes (torch.multiprocessing.spawn), shared with
  tests/test_optim_sharded.py (tests/sharded_launch.py, run once per session by
  tests/conftest.py's fixture `sharded_launch`; this module's worker runs after that one's),
  laid out as `vitscale train` does (Trainer._build_models: build_mesh, build_on_meta,
  parallelize, materialize from rank 0's CPU model), one forward / backward for the gradients
  FSDP2 and TP really leave, then one step of each optimizer: FSDP 4, HSDP 2 x 2 (also against
  FSDP 2's figure) and FSDP 2 x TP 2 on the four; then, as two worlds of two, TP 2 and FSDP 2.
  The workers only measure (local shard bytes, per tensor too); the comparisons run here, per
  layout and model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vitscale.config import OptimConfig
from vitscale.models.config import ModelConfig
from vitscale.optim import OPTIMIZERS, build_optimizer, state_bytes
from vitscale.parallel.mesh import Layout
from vitscale.plan import states
from vitscale.plan.states import model_state

# Tiny models; width 64 with AdafactorBV's default min_dim_size_to_factor 32 factors the dense
# kernels (64 x 64 attention, fc1 / fc2; not the head's 10 x 64: 10 < 32). mlp_dim 130: uneven
# over 4 ranks (33/33/33/31), 65 per rank under TP 2 (check_tp: tp divides it), then 33/32 over
# FSDP 2; 4 heads divide tp 2; the head's 10 rows 3/3/3/1; pos_embed's one row on rank 0 only.
TINY = dict(img_size=16, patch=4, width=64, depth=2, heads=4, mlp_dim=130, num_classes=10)
MODELS = {
    # The original ViT: sequential blocks, a class token, biases everywhere.
    "vit": ModelConfig(**TINY, pool="token"),
    # ViT-22B's shape: parallel blocks, QK-norm, no biases, a MAP head, no class token.
    "vit22b": ModelConfig(**TINY, block="parallel", qk_norm=True, qkv_bias=False,
                          proj_bias=False, mlp_bias=False, norm_bias=False, pool="map"),
}
OPTIMS = {name: OptimConfig(name=name) for name in OPTIMIZERS}
WORLD = 4
# The layouts, in two phases of one launch: first the 4 processes as one world, then as two
# worlds of 2 (ranks 0, 1 and ranks 2, 3), each running a 2-process layout of its own.
# name -> (layout, the launch's ranks that run it; their rank in it is rank % layout.size).
# (TP 2 on 4 processes, dp_replicate 2 x tp 2, puts the parameters on a 3-D mesh (FSDP2
# replicating over (dp_replicate, dp_shard) = (2, 1)), where the first step of torch's AdamW and
# SGD spends seconds per model in DTensor's sharding propagation (expand_to_full_mesh_op_strategy,
# 17 s for SGD on the vit model under cProfile): TP 2 runs as its own 2-process world instead, as
# `vitscale train parallel.tp=2` on 2 processes lays it out.)
LAYOUTS = {
    "fsdp4": (Layout(dp_shard=4), (0, 1, 2, 3)),
    "hsdp2x2": (Layout(dp_replicate=2, dp_shard=2), (0, 1, 2, 3)),
    "fsdp2xtp2": (Layout(dp_shard=2, tp=2), (0, 1, 2, 3)),
    "tp2": (Layout(tp=2), (0, 1)),
    "fsdp2": (Layout(dp_shard=2), (2, 3)),
}
# Also compared with another layout's figure: each HSDP 2 x 2 process holds what the FSDP 2
# process of its dp_shard index does.
SAME_AS = {"hsdp2x2": Layout(dp_shard=2)}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


# ---------------------------------------------------------------------------------- measuring
def _bytes(tensors) -> tuple[int, int]:
    """(bytes, elements) of the local shards of `tensors`."""
    from vitscale.utils.tensors import local

    shards = [local(t) for t in tensors]
    return sum(t.numel() * t.element_size() for t in shards), sum(t.numel() for t in shards)


def _measure(model: torch.nn.Module, optimizers) -> dict:
    """What this process holds: parameters and gradients (local shards, in all and per tensor:
    [shape, bytes per element]), and for each (name, optimizer) after its step state_bytes, in
    all and per parameter."""
    from vitscale.utils.tensors import local

    named = list(model.named_parameters())
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    out = {
        "params": _bytes(p for _, p in named)[0],
        "numel": _bytes(p for _, p in named)[1],
        "grads": _bytes(p.grad for _, p in named)[0],
        "param_shapes": {n: [list(local(p).shape), local(p).element_size()] for n, p in named},
        "grad_shapes": {n: [list(local(p.grad).shape), local(p.grad).element_size()]
                        for n, p in named},
        "optimizer": {},
        "optimizer_per_param": {},
    }
    for name, opt in optimizers:
        out["optimizer"][name] = state_bytes(opt)
        per_param = {}
        for n, p in named:
            st = opt.state.get(p, {})
            per_param[n] = sum(local(v).numel() * local(v).element_size()
                               for v in st.values() if torch.is_tensor(v))
        out["optimizer_per_param"][name] = per_param
    return out


def _optimizer_steps(model: torch.nn.Module):
    """(name, optimizer) for every optimizer over `model`, each stepped once on the gradients
    the model holds (the parameters move; their shapes and the gradients do not)."""
    for name, optim_cfg in OPTIMS.items():
        opt = build_optimizer(model, optim_cfg)
        opt.step()
        yield name, opt


# ---------------------------------------------------------------------------------- comparing
def _expected_param_bytes(cfg, optim_cfg, layout: Layout, rank: int) -> dict[str, tuple]:
    """name -> (predicted local shape, predicted optimizer bytes) for diagnostics."""
    _, params = states.meta_model(cfg)
    tp_index = rank % layout.tp
    shard_index = (rank // layout.tp) % layout.dp_shard
    shapes = {p.name: states.local_shape(p, layout, shard_index, tp_index) for p in params}
    per = {name: (per_el, whole) for name, per_el, whole in states._state_layout(cfg, optim_cfg)}
    return {n: (s, per[n][0] * math.prod(s) + per[n][1] if n in per else 0)
            for n, s in shapes.items()}


def _mismatches(where: str, cfg, layout: Layout, rank: int, actual: dict) -> list[str]:
    """Every category (params, grads, params_numel, optimizer per optimizer) where
    model_state(cfg, optim, layout, rank) differs from `actual`, with the tensors behind it."""
    out = []
    for optim_name, optim_cfg in OPTIMS.items():
        predicted = model_state(cfg, optim_cfg, layout, rank)
        detail = _expected_param_bytes(cfg, optim_cfg, layout, rank)
        checks = [("optimizer", predicted.optimizer, actual["optimizer"][optim_name])]
        if optim_name == next(iter(OPTIMS)):  # the same for every optimizer: report once
            checks = [("params", predicted.params, actual["params"]),
                      ("grads", predicted.grads, actual["grads"]),
                      ("params_numel", predicted.params_numel, actual["numel"])] + checks
        for category, want, got in checks:
            if want == got:
                continue
            line = (f"{where} planned as {layout} rank {rank}, {category}"
                    f"{'' if category != 'optimizer' else ' ' + optim_name}: "
                    f"predicted {want}, actual {got}")
            if category == "optimizer":
                tensors = [f"{n} predicted {detail[n][1]} B, actual {b} B"
                           for n, b in actual["optimizer_per_param"][optim_name].items()
                           if detail[n][1] != b]
            else:
                key = "grad_shapes" if category == "grads" else "param_shapes"
                tensors = [f"{n} predicted {list(detail[n][0])} fp32, actual {shape} "
                           f"({size} B per element)"
                           for n, (shape, size) in actual[key].items()
                           if list(detail[n][0]) != shape or size != states.FP32]
            out.append(line + "".join(f"\n    {t}" for t in tensors))
    return out


# ---------------------------------------------------------------------------------- in process
@pytest.mark.parametrize("model_name", list(MODELS))
def test_one_process_equals_the_built_model_and_optimizers(model_name):
    """One process (each DDP replica holds exactly this): the whole model, random gradients,
    one step of every optimizer."""
    from vitscale.models.registry import build

    cfg = MODELS[model_name]
    torch.manual_seed(0)
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    actual = _measure(model, _optimizer_steps(model))
    assert actual["numel"] == sum(p.numel() for p in model.parameters())
    problems = _mismatches(f"one process, {model_name}", cfg, Layout(), 0, actual)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------- launching
def _build_as_trainer(cfg, layout: Layout, mesh) -> torch.nn.Module:
    """The model as Trainer._build_models lays out a sharded run: on meta everywhere,
    parallelized, filled from rank 0's whole CPU model."""
    from vitscale.config import ParallelConfig
    from vitscale.models.registry import build
    from vitscale.parallel import build_on_meta, materialize, parallelize

    torch.manual_seed(0)
    source = build(cfg) if dist.get_rank() == 0 else None
    model = build_on_meta(lambda: build(cfg))
    parallelize(model, mesh, layout, ParallelConfig(dp_replicate=layout.dp_replicate,
                                                    dp_shard=layout.dp_shard, tp=layout.tp))
    materialize(model, torch.device("cpu"), source)
    return model


def _measure_layouts(names, results: dict) -> None:
    """Build each model in each of the layouts `names` (over the current world) as `vitscale
    train` does, one forward / backward (the gradients FSDP2's reduce-scatter and TP's hooks
    leave), one step of every optimizer; this process's figures into results[layout][model]."""
    from vitscale.parallel import build_mesh

    for layout_name in names:
        layout = LAYOUTS[layout_name][0]
        assert layout.size == dist.get_world_size(), layout_name
        mesh = build_mesh(layout, torch.device("cpu"))
        results[layout_name] = {}
        for model_name, cfg in MODELS.items():
            model = _build_as_trainer(cfg, layout, mesh)
            gen = torch.Generator().manual_seed(1)  # the same images on every rank
            x = torch.randn(2, 3, 16, 16, generator=gen)
            y = torch.randint(0, cfg.num_classes, (2,), generator=gen)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            results[layout_name][model_name] = _measure(model, _optimizer_steps(model))
            dist.barrier()


def measure_worker(rank: int, world: int, tmp: Path) -> None:
    """The layouts of all 4 processes, then those of 2 (a fresh default group of 2 per pair,
    which _worker's finally destroys); this rank's figures into results-<rank>.json."""
    assert world == WORLD
    results: dict[str, dict] = {}
    _measure_layouts([n for n, (layout, _) in LAYOUTS.items() if layout.size == world], results)
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp / f'init-pair-{rank // 2}'}",
                            rank=rank % 2, world_size=2)
    _measure_layouts([n for n, (layout, ranks) in LAYOUTS.items()
                      if layout.size == 2 and rank in ranks], results)
    (tmp / f"results-{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(sharded_launch) -> list[dict]:
    """From the session's one launch of 4 processes, shared with tests/test_optim_sharded.py
    (tests/sharded_launch.py: their start-up costs more than the checks): each rank's
    measurements, {layout: {model: ...}}, by rank."""
    tmp = sharded_launch / "test_plan_states"
    return [json.loads((tmp / f"results-{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_sharded_processes_equal_the_built_shards(measured, layout_name, model_name):
    """Per rank, every category (parameters, gradients, their count, every optimizer's state)."""
    layout, ranks = LAYOUTS[layout_name]
    cfg = MODELS[model_name]
    problems = []
    for rank in ranks:
        actual = measured[rank][layout_name][model_name]
        where = f"{layout_name} {model_name} (launch rank {rank})"
        problems += _mismatches(where, cfg, layout, rank % layout.size, actual)
        if layout_name in SAME_AS:
            other = SAME_AS[layout_name]
            problems += _mismatches(where, cfg, other, rank % other.size, actual)
    assert not problems, "\n".join(problems)
