"""Worker processes for tests/test_parallel_tp.py: tensor parallelism (TP = 2) on CPU with
gloo, every check against a one-process run of the same model with the same weights, computed
in the worker itself. A failed check raises (torch.multiprocessing.spawn re-raises it in the
test); rank 0 writes the measurements to `out`/result.json. OMP_NUM_THREADS=1 is set by the
test for the workers, never here: importing this module in the test process would change it
for every later subprocess (and break bitwise comparisons with in-process runs)."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitscale.errors import ConfigError
from vitscale.models.config import ModelConfig
from vitscale.models.vit import VisionTransformer

ATOL = 1e-5
TINY = dict(img_size=16, patch=4, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)

# name -> (model settings, sequence_parallel)
VARIANTS = {
    # ViT-22B: parallel blocks, QK-norm, no biases, MAP head, no class token (16 tokens).
    # drop_path: the last block's rate (0.5 here), the same masks as the one-process run's.
    "parallel": (dict(block="parallel", qk_norm=True, qkv_bias=False, proj_bias=False,
                      mlp_bias=False, norm_bias=False, pool="map", posemb="sincos2d",
                      drop_path=0.5), False),
    "parallel_sp": (dict(block="parallel", qk_norm=True, qkv_bias=False, proj_bias=False,
                         mlp_bias=False, norm_bias=False, pool="map", posemb="sincos2d",
                         drop_path=0.5), True),
    # The ViT paper's: sequential blocks, biases, a class token (17 tokens), learned posemb,
    # a pre-logits layer.
    "sequential": (dict(pool="token", head_hidden=32, drop_path=0.5), False),
    # Sequential blocks with SP: GAP (timm's norm after pooling), no class token, QK-norm and
    # biases (norms on sequence shards).
    "sequential_sp": (dict(pool="gap", gap_norm="pooled", qk_norm=True, drop_path=0.5), True),
}


def build(settings: dict, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(ModelConfig(**{**TINY, **settings}))
    with torch.no_grad():  # non-trivial norm / bias values, so their gradients matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def close(name: str, got, want, atol: float = ATOL) -> None:
    got, want = full(got).detach(), want.detach()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"{name}: max abs difference {err:.3g} > {atol}")


def step(model, images, labels, seed: int = 5):
    torch.manual_seed(seed)  # the same drop-path masks in every process
    out = model(images)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    return out, loss


def totals(comm) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}


def check_variant(name: str, mesh, rank: int) -> dict:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from vitscale.parallel.tp import apply_tp

    settings, sp = VARIANTS[name]
    ref = build(settings)
    model = copy.deepcopy(ref)
    apply_tp(model, mesh, sequence_parallel=sp)
    plain_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(plain_sd), f"{name}: state_dict keys changed"
    for key, value in sd.items():
        assert isinstance(value, DTensor), f"{name}: {key} is not a DTensor"
        assert value.shape == plain_sd[key].shape, f"{name}: {key} shape changed"
        assert torch.equal(value.full_tensor(), plain_sd[key]), f"{name}: {key} values changed"
    assert not any(getattr(b, "fusable", False) for b in model.blocks)
    qkv = model.blocks[0].attn.qkv.weight
    w, d = ref.blocks[0].attn.qkv.weight, TINY["width"]
    want = torch.cat([w[i * d + rank * d // 2: i * d + (rank + 1) * d // 2] for i in range(3)])
    assert torch.equal(qkv.to_local(), want), f"{name}: rank {rank} does not hold q, k, v of its heads"

    images, labels = batch()
    model.train(), ref.train()
    out_ref, loss_ref = step(ref, images, labels)
    torch.manual_seed(5)
    with CommDebugMode() as comm:
        out = model(images)
        loss = F.cross_entropy(out, labels)
        loss.backward()
    assert not isinstance(out, DTensor), f"{name}: the output should be a plain tensor"
    close(f"{name} output", out, out_ref)
    close(f"{name} loss", loss, loss_ref)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert tuple(p.grad.placements) == tuple(p.placements), \
            f"{name}: {pname} gradient {p.grad.placements} != parameter {p.placements}"
        close(f"{name} grad {pname}", p.grad, ref_params[pname].grad)

    # Evaluation path: no grad, eval mode (the plain model takes the fused CPU kernel).
    model.eval(), ref.eval()
    with torch.no_grad():
        close(f"{name} eval output", model(images), ref(images))
        close(f"{name} eval features", model.forward_features(images), ref.forward_features(images))

    # One-line errors, raised before any collective (no rank waits).
    for attempt, words in ((lambda: model(torch.zeros(1, 3, 32, 32)), "built size 16x16"),
                           (lambda: apply_tp(model, mesh), "already DTensors")):
        try:
            attempt()
        except ConfigError as e:
            assert words in str(e) and "\n" not in str(e), e
        else:
            raise AssertionError(f"{name}: expected a ConfigError about {words!r}")

    # Collectives of one block: block 1 (block 0 also re-shards the model's input under SP).
    counts = {fqn.split(".", 1)[-1]: {phase: {str(op).split(".")[-1]: n for op, n in c.items()}
                                      for phase, c in by_phase.items()}
              for fqn, by_phase in comm.comm_module_counts.items()}
    return {"per_block": counts.get("blocks.1", {}), "total": totals(comm), "modules": counts}


def check_checkpoint(mesh, rank: int, ckdir: str) -> dict:
    """DCP save / load through dcp_layout / restore_layout (with an AdamW step's state), raw DCP
    save refused, a meta-device build filled by load_full_state, the full-state-dict API."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from vitscale.parallel.tp import apply_tp, dcp_layout, load_full_state, restore_layout

    settings, _ = VARIANTS["parallel"]
    ref = build(settings)
    model = copy.deepcopy(ref)
    apply_tp(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, labels = batch()
    step(model, images, labels)
    opt.step()
    live = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    live.update({f"optim.{i}.{k}": v for i, (p, s) in enumerate(opt.state.items())
                 for k, v in s.items() if isinstance(v, torch.Tensor) and v.ndim})
    try:
        dcp.save(live, checkpoint_id=ckdir + "-raw")
    except CheckpointException as e:  # a BaseException
        assert "overlapping" in str(e), e
    else:
        raise AssertionError("DCP stored _StridedShard tensors: dcp_layout may be unnecessary now")
    dcp.save({k: dcp_layout(v) for k, v in live.items()}, checkpoint_id=ckdir)

    other = copy.deepcopy(build(settings, seed=3))
    apply_tp(other, mesh)
    target = {f"model.{k}": v for k, v in get_model_state_dict(other).items()}
    staged = {k: dcp_layout(v) for k, v in target.items()}
    dcp.load(staged, checkpoint_id=ckdir)
    for k in target:
        restore_layout(target[k], staged[k])
    for k, v in get_model_state_dict(model).items():
        assert torch.equal(full(v), full(dict(other.state_dict())[k])), f"DCP round trip: {k}"
        assert tuple(v.placements) == tuple(other.state_dict()[k].placements)
    trained = {k: full(v) for k, v in get_model_state_dict(model).items()}  # collective
    dist.barrier()
    if rank == 0:  # one process, no mesh: the plain model's tensors
        plain = {f"model.{k}": torch.empty_like(v) for k, v in ref.state_dict().items()}
        dcp.load(plain, checkpoint_id=ckdir, no_dist=True)
        for k, v in trained.items():
            assert torch.equal(plain[f"model.{k}"], v), f"DCP into one process: {k}"
    dist.barrier()

    # Meta-device build filled from rank 0's full weights (parallel.init.materialize's job).
    source = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    meta = build_meta(ref.cfg, mesh)
    load_full_state(meta, source if rank == 0 else None)
    for k, v in meta.state_dict().items():
        assert torch.equal(v.full_tensor(), ref.state_dict()[k]), f"meta + load_full_state: {k}"
    assert torch.equal(full(meta.pos_embed_fixed), ref.pos_embed_fixed)
    full_sd = get_model_state_dict(meta, options=StateDictOptions(full_state_dict=True))
    for k, v in full_sd.items():
        assert torch.equal(v, ref.state_dict()[k]), f"get_model_state_dict(full): {k}"
    # Every rank with the full dict: distribute_tensor, right.
    meta = build_meta(ref.cfg, mesh)
    set_model_state_dict(meta, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    for k, v in meta.state_dict().items():
        assert torch.equal(v.full_tensor(), ref.state_dict()[k]), f"full_state_dict: {k}"
    # Rank 0's dict broadcast: torch slices one contiguous chunk per rank (recorded, not checked).
    meta = build_meta(ref.cfg, mesh)
    set_model_state_dict(meta, ref.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return {"broadcast_from_rank0_wrong": sorted(
        k for k, v in meta.state_dict().items() if not torch.equal(v.full_tensor(), ref.state_dict()[k]))}


def build_meta(cfg, mesh):
    from vitscale.parallel.tp import apply_tp

    with torch.device("meta"):
        model = VisionTransformer(cfg)
    apply_tp(model, mesh)
    model.to_empty(device="cpu")
    return model


def check_dropout_dtensor(mesh, rank: int) -> dict:
    """What DTensor's own dropout does (the plan avoids it): masks of Replicate / Shard inputs
    across the ranks, and whether it moves the process's global generator."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(11)
    x = torch.ones(4, 8)
    before = torch.get_rng_state()
    rep = F.dropout(distribute_tensor(x, mesh, [Replicate()]), 0.5, True).to_local()
    shd = F.dropout(distribute_tensor(x, mesh, [Shard(0)]), 0.5, True)
    moved = not torch.equal(before, torch.get_rng_state())
    gathered = [torch.empty_like(rep) for _ in range(mesh.size())]
    dist.all_gather(gathered, rep.contiguous())
    local = shd.to_local().contiguous()
    shards = [torch.empty_like(local) for _ in range(mesh.size())]
    dist.all_gather(shards, local)
    return {"replicate_same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "shard_masks_differ": not torch.equal(shards[0], shards[1]),
            "global_rng_moved": moved}


def _debug(rank: int, what: str) -> None:
    if os.environ.get("TP_WORKER_DEBUG"):
        import time

        print(f"rank {rank}: {what} ok, {time.process_time():.1f} s CPU", flush=True)


def saved_under_tp(name: str, mesh) -> int:
    """Bytes of the distinct storages autograd saves on this rank in a training forward of
    the TP model (DTensors counted by their local tensors), its parameters' excepted: what
    vitscale.plan's activation model predicts per rank."""
    from torch.distributed.tensor import DTensor

    from vitscale.parallel.tp import apply_tp

    settings, sp = VARIANTS[name]
    model = build(settings)
    apply_tp(model, mesh, sp)
    model.train()

    def storage(t: torch.Tensor):
        while type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            # a DTensor's local tensor; a collective's result wrapper (AsyncCollectiveTensor)
            t = t._local_tensor if isinstance(t, DTensor) else getattr(t, t.__tensor_flatten__()[0][0])
        return t.untyped_storage()

    params = {storage(p).data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = storage(t)
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    images, _ = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(seen.values())


def tp2(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        result = {}
        for name in VARIANTS:
            result[name] = check_variant(name, mesh, rank)
            _debug(rank, name)
        result["saved"] = {name: saved_under_tp(name, mesh) for name in VARIANTS}
        result["checkpoint"] = check_checkpoint(mesh, rank, str(Path(out) / "dcp"))
        _debug(rank, "checkpoint")
        result["dropout_dtensor"] = check_dropout_dtensor(mesh, rank)
        if rank == 0:
            (Path(out) / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def main(rank: int, world: int, init: str, out: str, which: str, timeout: float = 120) -> None:
    import faulthandler

    # A deadlocked collective would hang the test: dump the stacks and exit instead.
    faulthandler.dump_traceback_later(timeout, exit=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    {"tp2": tp2}[which](rank, world, init, out)
    # Checked and written: leave without the interpreter's teardown, where a torch-internal
    # thread still joinable at exit aborted about 1 run in 3 here ("terminate called without an
    # active exception", SIGABRT) after every check had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
