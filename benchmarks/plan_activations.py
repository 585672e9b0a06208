"""The planner's activations against what autograd saves (vitscale.plan.measure), on CPU.

    python benchmarks/plan_activations.py [--batch 4] [--img-size 32] [--depth 4]

Ti and S (sequential blocks, class token) and a ViT-22B-shaped model (parallel blocks, QK-norm,
no biases, MAP head); fp32 and bf16 autocast; math and fused attention; checkpointing none,
full and every:2. Prints predicted / measured per case and the largest deviation.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from vitscale.models.registry import build, model_config
from vitscale.parallel.blocks import transformer_blocks
from vitscale.parallel.checkpointing import apply_activation_checkpointing
from vitscale.plan import activation_bytes
from vitscale.plan.measure import saved_bytes

SHAPES = {
    "Ti": ("Ti/4", {}),
    "S": ("S/4", {}),
    "vit22b": ("Ti/4", dict(block="parallel", qk_norm=True, qkv_bias=False, proj_bias=False,
                            mlp_bias=False, norm_bias=False, pool="map")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    img = args.img_size
    worst = 0.0
    print(f"{'model':7s} {'dtype':5s} {'kernel':6s} {'ckpt':5s} {'measured':>12s} "
          f"{'predicted':>12s} {'ratio':>6s}")
    for (key, (name, over)), every, precision, kernel in itertools.product(
            SHAPES.items(), (0, 1, 2), ("fp32", "bf16"), ("math", "flash")):
        torch.manual_seed(0)
        cfg = model_config(name, num_classes=10, img_size=img, depth=args.depth, **over)
        model = build(cfg).train()
        apply_activation_checkpointing(transformer_blocks(model), every)
        x = torch.randn(args.batch, 3, img, img)
        got = saved_bytes(model, x, precision == "bf16", kernel)
        pred = activation_bytes(cfg, args.batch, (img, img), precision, kernel=kernel,
                                every=every, device="cpu").saved
        worst = max(worst, abs(pred / got - 1))
        ckpt = {0: "none", 1: "full", 2: "ev:2"}[every]
        print(f"{key:7s} {precision:5s} {kernel:6s} {ckpt:5s} {got:12d} {pred:12.0f} "
              f"{pred / got:6.3f}")
    print(f"largest deviation: {worst:.1%}")


if __name__ == "__main__":
    main()
