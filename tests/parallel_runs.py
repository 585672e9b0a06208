"""Tiny training runs shared by tests/test_parallel.py: the one-process reference runs in the
test process, the same runs under torchrun in `main` (one process group, several runs).

    python -m torch.distributed.run --nproc_per_node N tests/parallel_runs.py OUT LAYOUT...
"""

from __future__ import annotations

import sys
from pathlib import Path

BASE = [
    "model.name=Ti/4", "model.overrides.width=64", "model.overrides.depth=2",
    "model.overrides.heads=4", "model.overrides.mlp_dim=128", "model.overrides.dropout=0.0",
    "data.img_size=16", "data.batch_size=16", "data.eval_batch_size=64", "data.augment=light1",
    "data.flip=false", "data.mixup_alpha=0.0", "schedule.warmup_steps=2", "steps=10",
    "log_every=1", "eval_every=10", "ckpt_every=10", "progress=false", "device=cpu",
]
MODELS = {
    # ViT-22B's shape: parallel blocks, QK-norm, no biases, a MAP head, no class token.
    "vit22b": ["model.overrides.block=parallel", "model.overrides.qk_norm=true",
               "model.overrides.qkv_bias=false", "model.overrides.proj_bias=false",
               "model.overrides.mlp_bias=false", "model.overrides.norm_bias=false",
               "model.overrides.pool=map"],
    # The original ViT: sequential blocks, a class token, biases everywhere.
    "vit": ["model.overrides.pool=token"],
}
OPTIMIZERS = {
    # eps=1e-6: the key bias's gradient is zero in exact arithmetic (softmax ignores a shift of
    # every logit), so with eps=1e-8 Adam turns its rounding noise into +-lr steps; that is the
    # same for DDP, and not what the comparison is about.
    "adamw": ["optim.name=adamw", "optim.lr=0.001", "optim.eps=1e-6"],
    "adam_bf16": ["optim.name=adam_bf16", "optim.lr=0.001", "optim.eps=1e-6"],
    "adafactor_bv": ["optim.name=adafactor_bv", "optim.lr=0.001", "optim.weight_decay=0.1",
                     "optim.lr_mults={head: 2.0}"],
    "sgd": ["optim.name=sgd", "optim.lr=0.1"],
}


def runs() -> dict[str, list[str]]:
    return {f"{m}-{o}": BASE + MODELS[m] + OPTIMIZERS[o] for m in MODELS for o in OPTIMIZERS}


# A tiny As-ViT with progressive re-tokenization (stride 8, then 4).
ASVIT = [o for o in BASE if not o.startswith("model.")] + [
    "model.name=asvit:4,2,2|2,1,2|2,1,2|2,1,2|8,16", "data.img_size=32", "optim.name=adamw",
    "retokenize=[[0,8,2],[0.5,4,1]]"]

# Runs of one layout only: name -> (the one-process run it is compared with, or None for one the
# test runs itself, and its own settings).
EXTRA = {
    "asvit": (None, ASVIT),
    "sp": ("vit22b-adamw", ["parallel.sequence_parallel=true"]),  # needs tp
    # FSDP mixed precision and autocast
    "bf16": ("vit22b-adamw", ["parallel.param_dtype=bfloat16", "precision=bf16"]),
    # Accumulation, EMA, the periodic few-shot evaluator: the training numbers are vit-adamw's.
    "features": ("vit-adamw", ["accum_steps=2", "ema_decay=0.9", "evals.fewshot.every=5",
                               "evals.fewshot.shots=[1,2]", "evals.fewshot.seeds=1"]),
}


# Settings a sharded run refuses, each with the words its one-line error must contain.
REFUSED = {
    "heads": (["model.overrides.heads=3", "model.overrides.width=48", "parallel.tp=2"], "heads"),
    "tokens": (["model.overrides.pool=token", "parallel.tp=2", "parallel.sequence_parallel=true"],
               "17 tokens"),
    "hybrid": (["model.name=R26+S/32", "data.img_size=32", "parallel.tp=2"], "hybrid"),
    "asvit": (["model.name=asvit-small", "data.img_size=32", "parallel.tp=2"], "As-ViT"),
}


def refusals(out: str) -> None:
    """Try each REFUSED setting; print `name: message` for each UserError (rank 0)."""
    import torch.distributed as dist

    from vitscale.errors import UserError
    from vitscale.train import run

    dist.init_process_group("gloo")
    for name, (overrides, _) in REFUSED.items():
        base = [o for o in BASE if not o.startswith("model.overrides.")] if name == "asvit" else BASE
        try:
            run(None, base + overrides + [f"out_dir={Path(out) / name}"])
            message = "no error"
        except UserError as exc:
            message = str(exc)
        if dist.get_rank() == 0:
            print(f"{name}: {message}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main(out: str, layout: list[str], only: list[str] | None = None) -> None:
    import torch.distributed as dist

    from vitscale.train import run

    dist.init_process_group("gloo")  # kept across the runs (the trainer leaves it alone)
    extra = [a.removeprefix("--extra=") for a in layout if a.startswith("--extra=")]
    layout = [a for a in layout if not a.startswith("--extra=")]
    todo = {**runs(), **{e: (runs()[EXTRA[e][0]] if EXTRA[e][0] else []) + EXTRA[e][1]
                         for e in extra}}
    for name, overrides in todo.items():
        if only and name not in only:
            continue
        run(None, overrides + layout + [f"out_dir={Path(out) / name}"])
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--refusals":
        refusals(args[1])
        sys.exit(0)
    only = args[args.index("--only") + 1].split(",") if "--only" in args else None
    if only:
        args = args[:args.index("--only")]
    main(args[0], args[1:], only)
