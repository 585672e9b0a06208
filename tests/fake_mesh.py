"""Run by tests/test_parallel.py in its own process: ViT-22B/14 and ViT-g/14 built on the meta
device and sharded over a fake 64-process mesh (dp_shard 16 x tp 4, the `fake` process-group
backend: no collectives run), printing rank 0's local parameter count and the analytic one as
JSON lines."""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from vitscale.config import ParallelConfig
from vitscale.models.counts import count
from vitscale.models.registry import any_config, build
from vitscale.parallel import Layout, build_mesh, build_on_meta, parallelize

DP, TP = 16, 4


def fsdp_rows(rows: int) -> int:
    """Rank 0's rows of a dim-0 FSDP shard: torch.chunk over DP pieces."""
    return math.ceil(rows / DP) if rows else 0


def analytic_local(cfg) -> tuple[int, int]:
    """(rank 0's parameter count, the whole model's), tensor by tensor from the architecture:
    the q/k/v and fc1 weights and the fc1 bias split by rows over TP, proj and fc2 weights by
    columns, every other tensor whole over TP (the fused q/k/v bias too: vitscale.parallel.tp);
    then one dim split over DP, dim 0 (dim 1 of the fused q/k/v weights; the same count)."""
    d, m, hd = cfg.width, cfg.mlp_dim, cfg.width // cfg.heads
    p = cfg.patch if isinstance(cfg.patch, int) else cfg.patch[0]
    tokens = cfg.num_patches + (1 if cfg.class_token and cfg.posemb_include_cls else 0)
    tensors: list[tuple[tuple[int, ...], int | None]] = [((d, cfg.in_chans, p, p), None), ((d,), None)]
    if cfg.posemb == "learn":
        tensors.append(((1, tokens, d), None))
    if cfg.class_token:
        tensors.append(((1, 1, d), None))
    norm = [((d,), None)] + ([((d,), None)] if cfg.norm_bias else [])
    block = list(norm) + [((3 * d, d), 0)] + ([((3 * d,), None)] if cfg.qkv_bias else [])
    if cfg.qk_norm:
        block += [((hd,), None)] * (4 if cfg.norm_bias else 2)
    block += [((d, d), 1)] + ([((d,), None)] if cfg.proj_bias else [])
    if cfg.block == "sequential":
        block += norm
    block += [((m, d), 0)] + ([((m,), 0)] if cfg.mlp_bias else [])
    block += [((d, m), 1)] + ([((d,), None)] if cfg.mlp_bias else [])
    tensors += block * cfg.depth + norm
    if cfg.pool == "map":
        mm = cfg.map_mlp_dim or m
        tensors += [((1, 1, d), None), ((d, d), 0)] + ([((d,), 0)] if cfg.qkv_bias else [])
        tensors += [((2 * d, d), 0)] + ([((2 * d,), None)] if cfg.qkv_bias else [])
        tensors += [((d, d), 1)] + ([((d,), None)] if cfg.proj_bias else []) + norm
        tensors += [((mm, d), 0)] + ([((mm,), 0)] if cfg.mlp_bias else [])
        tensors += [((d, mm), 1)] + ([((d,), None)] if cfg.mlp_bias else [])
    tensors += [((cfg.num_classes, d), None), ((cfg.num_classes,), None)]
    local = total = 0
    for shape, tp_dim in tensors:
        shape = list(shape)
        total += math.prod(shape)
        if tp_dim is not None:
            shape[tp_dim] //= TP
        local += fsdp_rows(shape[0]) * math.prod(shape[1:])
    return local, total


def main() -> None:
    dist.init_process_group("fake", rank=0, world_size=DP * TP, store=FakeStore())
    layout = Layout(1, DP, TP)
    mesh = build_mesh(layout, torch.device("cpu"))
    for name in ("22B/14", "g/14"):
        cfg = any_config(name, num_classes=1000, img_size=224)
        model = build_on_meta(lambda cfg=cfg: build(cfg))
        assert all(p.is_meta for p in model.parameters())
        parallelize(model, mesh, layout, ParallelConfig(dp_shard=DP, tp=TP))
        local = sum(p.to_local().numel() for p in model.parameters())
        expected, total = analytic_local(cfg)
        print(json.dumps({"name": name, "local": local, "expected": expected, "total": total,
                          "counted": count(cfg).params, "dtype_bytes": 4}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
