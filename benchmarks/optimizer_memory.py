"""Optimizer-state memory of each vitscale optimizer on a ViT, as a multiple of the fp32 weights.

    python benchmarks/optimizer_memory.py                 # ViT-B/16, all optimizers
    python benchmarks/optimizer_memory.py --model L/16 --optimizers adamw adafactor_bv
    python benchmarks/optimizer_memory.py --train     # + the demo recipe on digits with each

Every optimizer takes ONE step on random gradients set directly on the parameters (no forward
pass), which is when all of them have allocated their state. Expected (Scaling ViT): AdamW 2.0,
Adam with bf16 momentum 1.5, big_vision Adafactor ~0.5 (bf16 momentum plus factored second
moments), SGD with momentum 1.0.

`--train` then trains configs/demo.yaml (digits, from scratch) once per optimizer with the same
seed, lr and schedule, and prints the test accuracy of each beside its state size: the
memory-saving optimizers should reach AdamW's accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitscale.config import OptimConfig
from vitscale.models import create_model
from vitscale.optim import OPTIMIZERS, build_optimizer, state_bytes


def measure(model: torch.nn.Module, name: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.03, head_weight_decay=3.0))
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    used = state_bytes(opt)
    del opt
    return dict(name=name, state_mib=used / 2**20, ratio=used / param_bytes)


DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def train_on_digits(name: str, epochs: float, seed: int) -> dict:
    from vitscale.train import run

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run(str(DEMO), [f"optim.name={name}", f"epochs={epochs}", f"seed={seed}",
                                 "progress=false", f"out_dir={tmp}"])
        return dict(name=name, accuracy=result.metrics["test/accuracy"],
                    seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B/16")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--train", action="store_true",
                        help="also train the demo recipe on digits with each optimizer")
    parser.add_argument("--train-optimizers", nargs="+", default=["adamw", "adam_bf16", "adafactor_bv"],
                        choices=OPTIMIZERS)
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"ViT-{args.model}: {n / 1e6:.1f}M parameters, {4 * n / 2**20:.0f} MiB in fp32\n")
    print("| optimizer | state MiB | state / param bytes |")
    print("|---|---:|---:|")
    for name in args.optimizers:
        row = measure(model, name)
        print(f"| {row['name']} | {row['state_mib']:.0f} | {row['ratio']:.3f} |")
    if not args.train:
        return
    print(f"\nconfigs/demo.yaml on digits, {args.epochs:g} epochs, seed {args.seed}:\n")
    print("| optimizer | test accuracy | wall s |")
    print("|---|---:|---:|")
    for name in args.train_optimizers:
        row = train_on_digits(name, args.epochs, args.seed)
        print(f"| {row['name']} | {row['accuracy']:.4f} | {row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
