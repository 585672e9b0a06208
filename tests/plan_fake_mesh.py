"""Run by tests/test_plan_fake.py in its own process, on the `fake` process-group backend (no
collectives run) as rank 0 of a fake mesh; prints JSON lines.

    plan_fake_mesh.py track SETTINGS_JSON BATCH
        B/16 (224 px, 1000 classes) built and sharded as `vitscale train` builds it with
        parallel.dp_shard=8 (Trainer._build_models: build_on_meta, parallelize, then the local
        shards allocated), under FakeTensorMode (no memory, no arithmetic), with AdamW; two
        training steps as Trainer._train_step takes them (zero_grad, forward, softmax
        cross-entropy, backward, global-norm clipping, optimizer step) under PyTorch's
        FSDPMemTracker, the way torchtitan's scripts/estimate/estimation.py estimates memory.
        One line per setting ({"param_dtype": ..., "act_ckpt": ...}): the tracker's peak by
        category, its current figures after the second backward, and the attention kernels
        (aten op, dtype of the query) that ran.

    plan_fake_mesh.py layout MODEL LAYOUT_JSON WORLD
        MODEL built on the meta device and parallelized with the plan keywords LAYOUT_JSON
        (dp_replicate, dp_shard, tp, act_ckpt, param_dtype) on a fake WORLD-rank mesh, nothing
        allocated; one line: rank 0's local parameter bytes and numel.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from vitscale.config import OptimConfig, ParallelConfig
from vitscale.models.registry import any_config, build
from vitscale.parallel import Layout, build_mesh, build_on_meta, parallelize

CPU = torch.device("cpu")


class AttentionKernels(TorchDispatchMode):
    """Records the aten scaled-dot-product-attention ops that run, with the query's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "attention" in name and args and isinstance(args[0], torch.Tensor):
            self.seen.add((name, str(args[0].dtype).removeprefix("torch.")))
        return func(*args, **(kwargs or {}))


def _category(snapshot: dict) -> dict[str, int]:
    """{category name: bytes} of the CPU device of a tracker snapshot."""
    (per_device,) = snapshot.values()  # one device: the fake CPU tensors
    return {getattr(key, "value", key): int(value) for key, value in per_device.items()}


def track(settings: list[dict], batch: int) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from vitscale.optim import build_optimizer
    from vitscale.parallel import clip_grad_norm
    from vitscale.parallel.tp import reduce_replicated_grads
    from vitscale.train.loop import loss_fn

    shard = 8
    dist.init_process_group("fake", rank=0, world_size=shard, store=FakeStore())
    layout = Layout(1, shard, 1)
    mesh = build_mesh(layout, CPU)
    optim_cfg = OptimConfig(name="adamw")
    for setting in settings:
        parallel = ParallelConfig(dp_shard=shard, param_dtype=setting["param_dtype"],
                                  activation_checkpointing=setting["act_ckpt"])
        with FakeTensorMode():
            cfg = any_config("B/16", num_classes=1000, img_size=224)
            model = build_on_meta(lambda cfg=cfg: build(cfg))
            parallelize(model, mesh, layout, parallel)
            # vitscale.parallel.materialize without the values (fake tensors hold none): the
            # local shards allocated, then the gradient hooks it registers.
            model.to_empty(device=CPU)
            reduce_replicated_grads(model)
            optimizer = build_optimizer(model, optim_cfg)
            x = torch.randn(batch, 3, 224, 224)
            targets = torch.nn.functional.one_hot(torch.randint(0, 1000, (batch,)), 1000).float()
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((x, targets))
            kernels = AttentionKernels()
            with tracker:
                for step in range(2):  # the second step holds the optimizer state
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    if step == 0:
                        with kernels:
                            logits = model(x)
                            loss = loss_fn(logits, targets, "softmax", 0.0)
                            loss.backward()
                    else:
                        logits = model(x)
                        loss = loss_fn(logits, targets, "softmax", 0.0)
                        loss.backward()
                        after_backward = _category(tracker.get_tracker_snapshot("current"))
                    del logits, loss
                    # the trainer's verdict bool(isfinite(norm)) needs values: left out
                    clip_grad_norm([p for p in model.parameters() if p.grad is not None],
                                   optim_cfg.grad_clip)
                    optimizer.step()
                    if step == 0:
                        tracker.reset_mod_stats()  # else: "multiple iterative calls"
            peak = _category(tracker.get_tracker_snapshot("peak"))
        print(json.dumps({**setting, "batch": batch, "peak": peak,
                          "after_backward": after_backward,
                          "attention": sorted(kernels.seen)}), flush=True)
    dist.destroy_process_group()


def layout_on_meta(model_name: str, keywords: dict, world: int) -> None:
    layout = Layout(keywords["dp_replicate"], keywords["dp_shard"], keywords["tp"])
    assert layout.size == world, (layout, world)
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    mesh = build_mesh(layout, CPU)
    cfg = any_config(model_name, num_classes=1000)
    model = build_on_meta(lambda: build(cfg))
    parallelize(model, mesh, layout, ParallelConfig(
        dp_shard=layout.dp_shard, tp=layout.tp, dp_replicate=layout.dp_replicate,
        param_dtype=keywords["param_dtype"], activation_checkpointing=keywords["act_ckpt"]))
    params = list(model.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    print(json.dumps({
        "model": model_name, "layout": keywords, "world": world,
        "all_meta": all(p.is_meta for p in params),
        "all_dtensor": all(hasattr(p, "to_local") for p in params),
        "dtypes": sorted({str(t.dtype) for t in local}),
        "local_numel": sum(t.numel() for t in local),
        "local_bytes": sum(t.numel() * t.element_size() for t in local),
        "total_numel": sum(p.numel() for p in params)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "track":
        track(json.loads(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "layout":
        layout_on_meta(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
