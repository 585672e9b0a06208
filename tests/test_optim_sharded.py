"""The optimizers on sharded DTensor parameters against the same optimizer on the whole tensors.

One launch of four CPU gloo processes (torch.multiprocessing.spawn), shared with
tests/test_plan_states.py (tests/sharded_launch.py, run once per session by tests/conftest.py's
fixture `sharded_launch`), does many checks for both tests: DTensor placements as FSDP2, HSDP,
tensor parallelism and FSDP x TP lay parameters out (Shard on any axis, uneven and empty shards,
_StridedShard per head, 2-D meshes), then FSDP2's fully_shard itself, 4-way (uneven chunks of
factored axes); AdamW, AdamBF16, AdafactorBV (bf16 and fp32 momentum, factor_views, update
clipping) and SGD with weight-decay groups, an lr_mult and the schedule; parameters and state
(moments, Adafactor's row / column statistics) after five steps; torch.distributed.checkpoint
saved at one layout and loaded at another; clip_grad_norm_ and state_bytes per rank.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from vitscale.config import OptimConfig, ScheduleConfig
from vitscale.models.config import ModelConfig
from vitscale.models.registry import build
from vitscale.optim import apply_lr, build_optimizer, factor_view, state_bytes

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 5
SCHEDULE = ScheduleConfig(decay="cosine")
BASE = dict(lr=0.01, weight_decay=0.1, head_weight_decay=0.5,
            lr_mults={r"^head\.": 10.0, r"blocks\.0\.mlp": 0.5})
# name -> (optim.name, AdafactorBV group settings). min_dim_size_to_factor 4 factors every
# kernel of the tiny model, the per-head q / k / v / out kernels and q / k / v biases included.
OPTIMIZERS = {
    "adamw": ("adamw", {}),
    "adam_bf16": ("adam_bf16", {}),
    "sgd": ("sgd", {}),
    "adafactor_bv": ("adafactor_bv", {"min_dim_size_to_factor": 4, "clipping_threshold": 1.0}),
    "adafactor_bv_fp32": ("adafactor_bv", {"min_dim_size_to_factor": 4, "clipping_threshold": 0.5,
                                           "momentum_dtype": "float32"}),
}


# ---------------------------------------------------------------------------------- launching
@pytest.fixture(scope="module")
def launched(sharded_launch) -> Path:
    """The folder both_workers below wrote in the session's one launch of 4 processes, shared
    with tests/test_plan_states.py (tests/sharded_launch.py: their start-up costs more than the
    checks); each worker leaves `done-<worker>` behind when every check of it passed."""
    return sharded_launch / "test_optim_sharded"


def both_workers(rank: int, world: int, tmp: Path) -> None:
    for worker in (placements_worker, fsdp_worker):
        worker(rank, world, tmp)
        dist.barrier()
        if rank == 0:
            (tmp / f"done-{worker.__name__}").touch()


# ---------------------------------------------------------------------------------- helpers
def _tiny(heads: int = 4, pool: str = "token", depth: int = 2, seed: int = 0,
          mlp_dim: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return build(ModelConfig(width=64, depth=depth, heads=heads, mlp_dim=mlp_dim, img_size=16,
                             patch=4, num_classes=10, pool=pool))


def _optimizer(model: nn.Module, name: str, views: dict | None = None) -> torch.optim.Optimizer:
    kind, settings = OPTIMIZERS[name]
    opt = build_optimizer(model, OptimConfig(name=kind, **BASE))
    for group in opt.param_groups:
        group.update(settings)
        if views:
            group["factor_views"] = [views.get(n, v) for n, v in
                                     zip(group["param_names"], group["factor_views"])]
    return opt


def _grads(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Whole gradients, the same on every rank, their scale varying by step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = 10 ** (2 * torch.rand((), generator=gen).item() - 1)
        out.append({n: scale * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()})
    return out


def _shard(t: torch.Tensor, like) -> torch.Tensor:
    """t split as the DTensor `like` is (DTensor's own split, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)


def _set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Whole gradients, split as each parameter is; or DTensor gradients already split so (the
    optimizers do not write to gradients)."""
    from torch.distributed.tensor import DTensor

    for n, p in model.named_parameters():
        g = grads[n]
        p.grad = g if isinstance(g, DTensor) else _shard(g, p) if isinstance(p, DTensor) else g.clone()


def _steps(model: nn.Module, opt: torch.optim.Optimizer, grads, start: int = 0) -> None:
    total = start + len(grads) + 1
    for i, step_grads in enumerate(grads):
        apply_lr(opt, start + i, total, BASE["lr"], SCHEDULE)
        _set_grads(model, step_grads)
        opt.step()


def _compare(ours, ref, what: str, bf16: bool = False) -> None:
    """ours (a DTensor: its local shard) against the whole tensor ref (the same shard of it):
    within 1e-6. bf16: an fp32 last-bit difference upstream (the order of a sum across
    shards) now and then rounds a bf16 momentum entry the other way, one bf16 step, which the
    later steps carry; so at most 1% of the entries (or 2) off, by at most a bf16 step of the
    largest entry (for parameters lr 0.01 times that of a momentum, 2e-4)."""
    from torch.distributed.tensor import DTensor

    if isinstance(ours, DTensor):
        ref, ours = _shard(ref, ours).to_local(), ours.to_local()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape)
    is_momentum = ref.dtype == torch.bfloat16
    ours, ref = ours.double(), ref.double()
    if not bf16:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6, msg=what)
        return
    diff = (ours - ref).abs()
    if not diff.numel():
        return
    off = int((diff > 1e-6 + 1e-6 * ref.abs()).sum())
    bound = 2**-8 * ref.abs().max().item() if is_momentum else 2e-4
    assert off <= max(2, 0.01 * diff.numel()) and diff.max().item() <= bound, \
        (what, off, diff.numel(), diff.max().item())


def _compare_runs(model, opt, ref, ref_opt, name: str, layout: str) -> None:
    from torch.distributed.tensor import DTensor, Replicate

    bf16 = name == "adafactor_bv"
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        what = f"{layout} {name} {n}"
        assert isinstance(p, DTensor), what
        _compare(p, ref_params[n], what, bf16)
        state, ref_state = opt.state[p], ref_opt.state[ref_params[n]]
        assert state.keys() == ref_state.keys(), what
        for key, value in state.items():
            if not torch.is_tensor(value) or (key == "step" and value.ndim == 0):
                assert value == ref_state[key], (what, key)
                continue
            assert isinstance(value, DTensor), (what, key)
            if value.shape == p.shape:  # the parameter's placements
                assert value.placements == p.placements and value.device_mesh == p.device_mesh, (what, key)
            else:  # Adafactor's statistics: whole on every rank
                assert all(isinstance(pl, Replicate) for pl in value.placements), (what, key)
            if key.startswith("exp_avg_sq"):  # means of squares: relative
                expected = _shard(ref_state[key], value).to_local()
                torch.testing.assert_close(value.to_local(), expected, rtol=2e-6, atol=0,
                                           msg=f"{what} {key}")
            else:
                _compare(value, ref_state[key], f"{what} {key}", bf16 and key == "exp_avg")
    # What is replicated is the same on every rank, to the bit.
    whole = [v.to_local().reshape(-1).float() for st in opt.state.values() for v in st.values()
             if isinstance(v, DTensor) and all(isinstance(pl, Replicate) for pl in v.placements)]
    if whole:
        whole = torch.cat(whole)
        gathered = [torch.empty_like(whole) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, whole)
        assert all(torch.equal(g, whole) for g in gathered), f"{layout} {name}: replicas differ"


def _distribute(model: nn.Module, layout) -> nn.Module:
    """A copy of model, each parameter a DTensor with placements layout(name, param)."""
    from torch.distributed.tensor import distribute_tensor

    model = copy.deepcopy(model)
    for prefix, module in model.named_modules():
        for key, p in list(module.named_parameters(recurse=False)):
            mesh, placements = layout(f"{prefix}.{key}".lstrip("."), p)
            module.register_parameter(key, nn.Parameter(
                distribute_tensor(p.detach(), mesh, placements, src_data_rank=None)))
    return model


# ---------------------------------------------------------------------------------- layouts
def _layouts(world: int):
    """layout name -> (parameter name, parameter) -> (mesh, placements), on 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    flat = init_device_mesh("cpu", (world,))
    grid = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))

    def fsdp(name, p):  # FSDP2: dim 0; the tokens and pos_embed (dim 0 of size 1) on rank 0
        return flat, [Shard(0)]

    def hsdp(name, p):
        return grid, [Replicate(), Shard(0)]

    def tp(name, p):  # Megatron: colwise qkv / kv per head, fc1; rowwise proj, fc2
        out = [Replicate()]
        if name.endswith(("qkv.weight", "qkv.bias")):
            out = [_StridedShard(0, split_factor=3)]
        elif name.endswith(("kv.weight", "kv.bias")):
            out = [_StridedShard(0, split_factor=2)]
        elif name.endswith(("fc1.weight", "fc1.bias", "q.weight", "q.bias")):
            out = [Shard(0)]
        elif name.endswith(("proj.weight", "fc2.weight")) and p.ndim == 2:
            out = [Shard(1)]
        elif name in ("head.weight", "patch_embed.proj.weight", "pos_embed"):
            out = [Shard(1)]  # 64 / 4; 3 input channels over 4 ranks; 17 tokens over 4
        return flat, out

    def fsdp_tp(name, p):  # FSDP2 on dp over TP on tp; the rest sharded by both mesh dims
        if name.endswith("qkv.weight"):  # vitscale.parallel.tp: FSDP2 on the input dim
            return grid, [Shard(1), _StridedShard(0, split_factor=3)]
        if name.endswith("kv.weight"):
            return grid, [Shard(1), _StridedShard(0, split_factor=2)]
        if name.endswith("qkv.bias"):  # rows split by dp, then per head by tp
            return grid, [Shard(0), _StridedShard(0, split_factor=3)]
        if name.endswith(("fc1.weight", "fc1.bias")):  # FSDP2 over colwise TP: right to left
            return grid, [_StridedShard(0, split_factor=2), Shard(0)]
        if p.ndim >= 2:  # rowwise proj / fc2 under FSDP; the head, tokens, pos_embed, patch conv
            return grid, [Shard(p.ndim - 2), Shard(p.ndim - 1)]
        return grid, [Shard(0), Shard(0)]  # one axis split by both mesh dims

    return {"fsdp": fsdp, "hsdp": hsdp, "tp": tp, "fsdp_tp": fsdp_tp}


def placements_worker(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor, Partial

    # 2 heads of 32: 4-way row shards of qkv end mid-head, column shards of proj too. MAP head:
    # its q (1 kernel) and kv (2) views.
    base = _tiny(heads=2, pool="map", depth=1)
    grads = _grads(base, STEPS)
    layouts = _layouts(world)
    # A view that merges tensor axes (fc1 (128, 64) as (256, 32)): its sums gather the tensor.
    merged = {"blocks.0.mlp.fc1.weight": factor_view((256, 32), (0, 1))}
    for layout_name, layout in layouts.items():
        model = _distribute(base, layout)
        params = dict(model.named_parameters())
        shard_grads = [{n: _shard(g, params[n]) for n, g in step.items()} for step in grads]
        # vitscale's optimizers take a gradient in other placements than its parameter's: here
        # a Partial sum (rank 0 holds it all) for the replicated out-projection bias under TP.
        bias = "blocks.0.attn.proj.bias"
        partial_grads = [{**step, bias: DTensor.from_local(
            grads[i][bias] * (rank == 0), params[bias].device_mesh, [Partial()])}
            for i, step in enumerate(shard_grads)] if layout_name == "tp" else shard_grads
        if layout_name in ("tp", "fsdp_tp"):  # the norm clip_grad_norm_ clips by is the global one
            ref = copy.deepcopy(base)
            _set_grads(ref, grads[0])
            _set_grads(model, {n: g.clone() for n, g in shard_grads[0].items()})
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            assert ref_norm > 1.0
            torch.testing.assert_close(norm.full_tensor(), ref_norm, rtol=1e-6, atol=0)
            for n, p in ref.named_parameters():
                _compare(params[n].grad, p.grad, f"{layout_name} clipped grad {n}")
        for name in OPTIMIZERS:
            # All but AdafactorBV's sums are elementwise on the local shards (its bf16 rounding
            # of the momentum too): fewer layouts suffice for them. (torch's AdamW and SGD are
            # also checked under fully_shard, below.)
            if (name != "adafactor_bv_fp32" and layout_name not in ("tp", "fsdp_tp")
                    or name in ("adamw", "sgd") and layout_name != "fsdp_tp"):
                continue
            views = merged if name.startswith("adafactor") else None
            ref = copy.deepcopy(base)
            if model is None:  # the first run uses the one built above
                model = _distribute(base, layout)
            opt, ref_opt = _optimizer(model, name, views), _optimizer(ref, name, views)
            _steps(model, opt, shard_grads if name in ("adamw", "sgd") else partial_grads)
            _steps(ref, ref_opt, grads)
            _compare_runs(model, opt, ref, ref_opt, name, layout_name)
            model = None

    # Checkpoint at one layout (FSDP), resume at another (HSDP), one more step each. (Not to
    # the per-head _StridedShard layouts: DCP describes a shard by one offset, so it refuses to
    # save a shard that is not one block of the tensor, and loads into one wrongly.)
    for name in ("adafactor_bv_fp32",):
        ref = copy.deepcopy(base)
        model = _distribute(base, layouts["fsdp"])
        opt, ref_opt = _optimizer(model, name), _optimizer(ref, name)
        _steps(model, opt, grads[:3])
        _steps(ref, ref_opt, grads[:3])
        msd, osd = get_state_dict(model, opt)
        path = tmp / f"ckpt-{name}"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        other = _distribute(_tiny(heads=2, pool="map", depth=1, seed=1), layouts["hsdp"])
        other_opt = _optimizer(other, name)
        msd, osd = get_state_dict(other, other_opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
        set_state_dict(other, other_opt, model_state_dict=msd, optim_state_dict=osd)
        _steps(other, other_opt, grads[3:4], start=3)
        _steps(ref, ref_opt, grads[3:4], start=3)
        _compare_runs(other, other_opt, ref, ref_opt, name, "fsdp -> hsdp")


def test_optimizers_on_dtensor_placements(launched):
    assert (launched / "done-placements_worker").is_file()


# ---------------------------------------------------------------------------------- FSDP2
MLP = 130  # uneven over 4 ranks


def _fully_shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def fsdp_worker(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    base = _tiny(mlp_dim=MLP)
    grads = _grads(base, STEPS)
    sharded = _fully_shard(copy.deepcopy(base), mesh)
    params = dict(sharded.named_parameters())
    # Uneven 4-way chunks of dim 0: fc1 (130 rows, the factored axis the row means run over)
    # 33/33/33/31, head (10 rows) 3/3/3/1, cls_token and pos_embed (1 row) whole on rank 0.
    assert world == 4
    assert params["blocks.0.mlp.fc1.weight"].to_local().shape[0] == [33, 33, 33, 31][rank]
    assert params["head.weight"].to_local().shape[0] == [3, 3, 3, 1][rank]
    assert params["pos_embed"].to_local().shape[0] == (1 if rank == 0 else 0)

    # clip_grad_norm_ over DTensor gradients: the global norm, the same clipped gradients.
    ref = copy.deepcopy(base)
    _set_grads(sharded, grads[0])
    _set_grads(ref, grads[0])
    norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    assert isinstance(norm, DTensor) and ref_norm > 1.0
    torch.testing.assert_close(norm.full_tensor(), ref_norm, rtol=1e-6, atol=0)
    for n, p in ref.named_parameters():
        _compare(params[n].grad, p.grad, f"clipped grad {n}")

    for name in OPTIMIZERS:
        model, ref = _fully_shard(copy.deepcopy(base), mesh), copy.deepcopy(base)
        opt, ref_opt = _optimizer(model, name), _optimizer(ref, name)
        _steps(model, opt, grads)
        _steps(ref, ref_opt, grads)
        _compare_runs(model, opt, ref, ref_opt, name, "fully_shard")
        # state_bytes counts this rank's shards: over the ranks, the param-shaped state once,
        # what every rank holds whole (Adafactor's statistics, AdamW's step tensors) per rank.
        total = torch.tensor(float(state_bytes(opt)))
        dist.all_reduce(total)
        whole_bytes = sum(v.numel() * v.element_size() for p, st in ref_opt.state.items()
                          for v in st.values() if torch.is_tensor(v) and v.shape != p.shape)
        assert total.item() == state_bytes(ref_opt) + (world - 1) * whole_bytes, name

        # torch.distributed.checkpoint: sharded -> whole (on each rank), and for AdafactorBV
        # whole -> sharded; the next steps against the run that never stopped. And a plain
        # load_state_dict of the whole optimizer's state into a sharded one (vitscale's
        # optimizers split it at their next step).
        if name not in ("adamw", "adam_bf16", "adafactor_bv_fp32"):
            continue
        resumed = []
        if name != "adamw":
            plain = _fully_shard(copy.deepcopy(ref), mesh)
            plain_opt = _optimizer(plain, name)
            plain_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
            resumed.append((plain, plain_opt))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / f"sharded-{name}")
        whole = _tiny(seed=1, mlp_dim=MLP)  # not the saved weights
        whole_opt = _optimizer(whole, name)
        msd, osd = get_state_dict(whole, whole_opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=tmp / f"sharded-{name}")
        set_state_dict(whole, whole_opt, model_state_dict=msd, optim_state_dict=osd)
        resumed.append((whole, whole_opt))
        if name == "adafactor_bv_fp32":
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / f"whole-{name}")
            again = _fully_shard(_tiny(seed=2, mlp_dim=MLP), mesh)
            again_opt = _optimizer(again, name)
            msd, osd = get_state_dict(again, again_opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=tmp / f"whole-{name}")
            set_state_dict(again, again_opt, model_state_dict=msd, optim_state_dict=osd)
            resumed.append((again, again_opt))
        extra = _grads(base, 2, seed=2)
        for m, o in [*resumed, (ref, ref_opt)]:
            _steps(m, o, extra, start=STEPS)
        ref_params = dict(ref.named_parameters())
        for n, p in whole.named_parameters():
            _compare(p, ref_params[n], f"whole after DCP {name} {n}")
            for key, value in whole_opt.state[p].items():
                expected = ref_opt.state[ref_params[n]][key]
                assert not torch.is_tensor(value) or value.dtype == expected.dtype, (n, key)
                torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-6, msg=f"{n} {key}")
        if name == "adafactor_bv_fp32":
            _compare_runs(again, again_opt, ref, ref_opt, name, "sharded -> whole -> sharded")
        if name != "adamw":
            _compare_runs(plain, plain_opt, ref, ref_opt, name, "whole load_state_dict -> sharded")

    # get_optimizer_state_dict on a fresh optimizer steps it with zero gradients and lr 0 to
    # create its state: the parameters must not move (adafactor_bv decays by scheduled_lr).
    model = _fully_shard(copy.deepcopy(base), mesh)
    opt = _optimizer(model, "adafactor_bv")
    get_optimizer_state_dict(model, opt)
    for n, p in base.named_parameters():
        _compare(dict(model.named_parameters())[n], p, f"fresh state dict {n}")


def test_optimizers_under_fully_shard_and_dcp(launched):
    assert (launched / "done-fsdp_worker").is_file()
