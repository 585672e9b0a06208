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
    "data.img_size=16", "data.batch_size=16", "data.eval_batch_size=512", "data.augment=light1",
    "data.flip=false", "data.mixup_alpha=0.0", "schedule.warmup_steps=2", "steps=10",
    "log_every=1", "eval_every=10", "ckpt_every=10", "keep_checkpoints=3", "progress=false",
    "device=cpu",
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
    # Sequence parallelism (needs tp) and activation checkpointing change no number.
    "sp": ("vit22b-adafactor_bv", ["parallel.sequence_parallel=true"]),
    "sp-ac": ("vit22b-adam_bf16", ["parallel.sequence_parallel=true",
                                   "parallel.activation_checkpointing=full"]),
    # The 4-process checkpoint tests/test_parallel.py resumes on other meshes.
    "mesh-source": ("vit-adamw", ["ckpt_every=5"]),
    # tests/test_parallel.py's SIGKILL test resumes this run (drop-path draws, EMA).
    "resume": ("vit22b-adamw", ["steps=9", "ckpt_every=3", "ema_decay=0.9",
                                "model.overrides.drop_path=0.1"]),
    # FSDP mixed precision and autocast
    "bf16": ("vit22b-adamw", ["parallel.param_dtype=bfloat16", "precision=bf16"]),
    # Mixup and CutMix (one per step, drawn by seed and step): under TP alone every rank mixes
    # the whole batch the same way, so the run equals one process doing the same.
    "mix": ("vit-adamw", ["data.mixup_alpha=0.5", "data.cutmix_alpha=1.0"]),
    # Accumulation, EMA, the periodic few-shot evaluator: the training numbers are vit-adamw's.
    "features": ("vit-adamw", ["accum_steps=2", "ema_decay=0.9", "evals.fewshot.every=5",
                               "evals.fewshot.shots=[1,2]", "evals.fewshot.seeds=1"]),
    # Distillation (function matching at temperature 2) from a frozen teacher sharded as the
    # student is, its forward passes in lockstep in evaluation too (`distill_teacher`).
    "distill": ("vit-adamw", ["objective=distill", "distill.temperature=2.0"]),
}


def distill_teacher(folder: Path) -> Path:
    """The "distill" run's teacher: a model of the vit shape, initialised from seed 7, saved
    once into folder/teacher (by one process)."""
    path = folder / "teacher"
    if not path.exists():
        import torch

        from vitscale.config import load_config
        from vitscale.models import create_model, save

        cfg = load_config(None, runs()["vit-adamw"])
        torch.manual_seed(7)
        save(create_model(cfg.model.build_config(10, cfg.data.img_size)), path)
    return path


def with_teacher(name: str, folder: Path) -> list[str]:
    """The run's settings plus, for "distill", its teacher in `folder`."""
    extra = [f"distill.teachers=[{distill_teacher(folder)}]"] if name == "distill" else []
    return settings(name) + extra


# Masked patch prediction under plain DDP (torchrun, no parallel.*): each process takes its
# slice of the global batch's masks, so the run follows the one-process run (the 2-process
# launch trains it after its refusals, into OUT/ddp-mpp).
PRETRAIN_DDP = BASE + ["objective=mpp", "model.overrides.pool=gap",
                       "model.overrides.posemb=sincos2d", "optim.name=adamw", "optim.lr=0.001",
                       "optim.eps=1e-6", "steps=6", "eval_every=6", "ckpt_every=6"]

# Settings a sharded run refuses, each with the words its one-line error must contain.
REFUSED = {
    "pretrain": (["objective=mpp", "parallel.dp_shard=2"], "not supported with parallel.dp_shard"),
    "heads": (["model.overrides.heads=3", "model.overrides.width=48", "parallel.tp=2"], "heads"),
    "tokens": (["model.overrides.pool=token", "parallel.tp=2", "parallel.sequence_parallel=true"],
               "17 tokens"),
    "hybrid": (["model.name=R26+S/32", "data.img_size=32", "parallel.tp=2"], "hybrid"),
    "asvit": (["model.name=asvit-small", "data.img_size=32", "parallel.tp=2"], "As-ViT"),
    # plain DDP (no parallel.*): the global batch must split over processes and micro-batches
    "batch": (["data.batch_size=34", "accum_steps=2"],
              "data.batch_size=34 must be divisible by accum_steps=2 x 2 data-parallel processes"),
}


# What each multi-process launch of tests/test_parallel.py trains: {layout name: (processes,
# parallel.* settings, runs)}. Every layout trains both model shapes; the optimizers are spread
# over the layouts (each one's arithmetic on every placement is tests/test_optim_sharded.py's,
# so here the trainer's use of them is what is compared). HSDP 2 x 2 (FSDP's arithmetic,
# replicated): big_vision's Adafactor. Four processes share the two cores of a development
# machine.
FSDP_PAIRS = ["vit22b-adamw", "vit-adafactor_bv"]
# Runs with settings that change no number (EXTRA) stand for their reference pairs.
FOUR_TP = ["sp", "vit-adamw"]
FOUR_SOURCE = ["sp-ac", "mesh-source"]
LAUNCHES = {
    "two": (2, {"fsdp2": (["parallel.dp_shard=2"],
                          FSDP_PAIRS + ["bf16", "features", "asvit", "resume", "distill"]),
                "tp2": (["parallel.tp=2"], FOUR_TP + ["mix"])}),
    "four": (4, {"fsdp2xtp2": (["parallel.dp_shard=2", "parallel.tp=2"], FOUR_SOURCE),
                 "hsdp2x2": (["parallel.dp_replicate=2", "parallel.dp_shard=2"],
                             ["vit22b-adafactor_bv"])}),
}


def reference(name: str) -> str | None:
    """The one-process run of `runs()` a run must follow exactly (None: it has none)."""
    if name in runs():
        return name
    base = EXTRA.get(name, (None,))[0]
    return base if name in ("sp", "sp-ac", "features", "mesh-source") else None


def settings(name: str) -> list[str]:
    """The settings of a run of `runs()` or `EXTRA` by name."""
    if name in EXTRA:
        base, own = EXTRA[name]
        return (runs()[base] if base else []) + own
    return runs()[name]


def refusals(out: Path) -> None:
    """Try each REFUSED setting; print `name: message` for each UserError (rank 0)."""
    import torch.distributed as dist

    from vitscale.errors import UserError
    from vitscale.train import run

    for name, (overrides, _) in REFUSED.items():
        base = [o for o in BASE if not o.startswith("model.overrides.")] if name == "asvit" else BASE
        try:
            run(None, base + overrides + [f"out_dir={out / name}"])
            message = "no error"
        except UserError as exc:
            message = str(exc)
        if dist.get_rank() == 0:
            print(f"refused {name}: {message}", flush=True)
        dist.barrier()


# The 4-process launch's step-5 checkpoint of this run, resumed on 2 processes (FSDP only) by
# the 2-process launch, which therefore runs second and is given the 4-process launch's folder.
MESH_SOURCE = ("four", "fsdp2xtp2", "mesh-source")
READS = {"two": "four"}


def resume_on_two(source: Path, out: Path) -> None:
    """Copy the run `source` without its step-10 checkpoint and final weights to `out`, and
    resume it from step 5 with FSDP 2 (rank 0 copies; the trainer warns on stderr)."""
    import shutil

    import torch.distributed as dist

    from vitscale.train import run

    if dist.get_rank() == 0:
        shutil.copytree(source, out, ignore=shutil.ignore_patterns("model", "model_ema"))
        shutil.rmtree(out / "checkpoints" / "step-000000010")
        (out / "checkpoints" / "latest").write_text("step-000000005\n")
    dist.barrier()
    run(None, settings("mesh-source") + ["parallel.dp_shard=2", f"out_dir={out}"])


def main(out: str, launch: str, read: str | None = None) -> None:
    """Every run of LAUNCHES[launch] into OUT/<layout>/<run>, then (on 2 processes) the refused
    settings into OUT/refused/<name> and the 4-process checkpoint resumed into OUT/mesh-on-2
    (READ: the 4-process launch's folder)."""
    import torch.distributed as dist

    from vitscale.train import run

    dist.init_process_group("gloo")  # kept across the runs (the trainer leaves it alone)
    if dist.get_rank() == 0:
        distill_teacher(Path(out))
    dist.barrier()
    for layout, (parallel, names) in LAUNCHES[launch][1].items():
        for name in names:
            run(None, with_teacher(name, Path(out)) + parallel
                + [f"out_dir={Path(out) / layout / name}"])
    if launch == "two":
        refusals(Path(out) / "refused")
        run(None, PRETRAIN_DDP + [f"out_dir={Path(out) / 'ddp-mpp'}"])
        resume_on_two(Path(read).joinpath(*MESH_SOURCE[1:]), Path(out) / "mesh-on-2")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
