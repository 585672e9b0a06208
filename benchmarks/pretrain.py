"""Self-supervised pre-training on digits: MPP and MAE against training from scratch.

    python benchmarks/pretrain.py                       # seeds 0 1 2 (docs/benchmarks.md has the time)
    python benchmarks/pretrain.py --seeds 0 --pretrain-epochs 10
    python benchmarks/pretrain.py --flops           # MAE vs MPP FLOPs per step, ViT-B/16 (seconds)

Per seed, one encoder (a small ViT at 16 px in 4x4 patches) is pre-trained on the digits train
split with its labels never read: `objective=mpp` (the ViT paper's masked patch prediction, 50%
of the patch embeddings corrupted 80/10/10, 3-bit mean colour target) and `objective=mae`
(75% of the patches hidden, a 2-block decoder, normalised-pixel loss), and MPP with the paper's
L2 ablation (`mpp.target=l2`: the patch's pixels regressed; digits are grey, so the 3-bit mean
colour has only 8 values, mostly black). Then:
- fine-tuning with 10% of the labels (`data.train_fraction=0.1`: a fixed stratified 129 of the
  1,293 non-minival train images), the same recipe and steps from the MPP encoder, the MAE
  encoder and a random initialisation (scratch); test accuracy on the fixed 360 test images;
- 10-shot linear regression (big_vision's few-shot evaluator, 5 draws of the shots) on the frozen
  features of each pre-trained encoder and of the random-init one.
Reported: mean and standard deviation over the seeds, each seed's difference to scratch, and the
wall time of each stage (this machine's; a ratio only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ENCODER = [
    "model.name=Ti/4", "model.overrides.width=96", "model.overrides.depth=4",
    "model.overrides.heads=4", "model.overrides.mlp_dim=192", "model.overrides.pool=gap",
    "model.overrides.posemb=sincos2d", "data.img_size=16", "data.augment=none",
    "data.crop_scale_min=0.6", "progress=false", "device=cpu",
]
PRETRAIN = {
    "mpp": ["objective=mpp"],
    "mpp-l2": ["objective=mpp", "mpp.target=l2"],  # the paper's L2 ablation
    "mae": ["objective=mae", "mae.decoder_width=64", "mae.decoder_depth=2", "mae.decoder_heads=4"],
}
PRETRAIN_RECIPE = ["data.batch_size=64", "optim.name=adamw", "optim.lr=0.001",
                   "optim.weight_decay=0.05", "optim.grad_clip=1.0", "schedule.decay=cosine",
                   "schedule.warmup_fraction=0.05"]
# One fine-tuning recipe for every arm: 10% of the labels, the demo recipe's optimiser.
FINETUNE = ["data.train_fraction=0.1", "data.batch_size=32", "optim.name=adamw",
            "optim.weight_decay=0.05", "optim.grad_clip=1.0", "schedule.decay=cosine",
            "schedule.warmup_fraction=0.1", "label_smoothing=0.1", "model.overrides.drop_path=0.1"]


def stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def random_init_fewshot(seed: int, shots: int) -> float:
    import torch

    from vitscale.config import load_config
    from vitscale.data import build_data
    from vitscale.eval.api import fewshot_model
    from vitscale.train.loop import build_model

    cfg = load_config(None, [*ENCODER, *PRETRAIN["mpp"], f"seed={seed}"])
    torch.manual_seed(seed)
    model = build_model(cfg, 0)
    data = build_data(load_config(None, [*ENCODER, "data.augment=none"]).data, seed)
    return fewshot_model(model, data, [shots], seeds=5)["results"][0]["mean"]


def flops(name: str = "B/16", img_size: int = 224) -> None:
    """Forward + backward FLOPs per image (torch's FLOP counter, math attention) of the encoder
    alone and of the whole step, MAE (default decoder: 8 blocks, width 512) against MPP."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vitscale.config import MAEConfig, MPPConfig
    from vitscale.models.registry import any_config, build
    from vitscale.objectives import MaskedAutoencoder, MaskedPatchPrediction
    from vitscale.objectives.mpp import corrupt

    model = build(any_config(name, num_classes=0, img_size=img_size))
    mae = MaskedAutoencoder(MAEConfig(), model, batch_size=1)
    mpp = MaskedPatchPrediction(MPPConfig(), model, batch_size=1)
    x = torch.randn(1, 3, img_size, img_size)
    hide, corrupt_plan = mae.prepare(x, None, None, 1.0, 0), mpp.prepare(x, None, None, 1.0, 0)

    def counted(loss) -> float:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss().backward()
        return counter.get_total_flops() / 1e9

    mask = mpp.trainable().mask_token
    rows = {
        "encoder": (counted(lambda: model(x, outputs="tokens", keep=hide[:, :mae.keep]).sum()),
                    counted(lambda: model(x, outputs="tokens", patch_hook=lambda e: corrupt(
                        e, corrupt_plan, mask)).sum())),
        "whole step": (counted(lambda: mae.loss(model, x, None, hide)[0]),
                       counted(lambda: mpp.loss(model, x, None, corrupt_plan)[0])),
    }
    print(f"| {name} at {img_size} px, per image | MAE GFLOPs | MPP GFLOPs | MAE / MPP |")
    print("|---|---|---|---|")
    for what, (a, b) in rows.items():
        print(f"| {what} (forward + backward) | {a:.1f} | {b:.1f} | {a / b:.3f} |")


def one_seed(seed: int, out: Path, pretrain_epochs: float, finetune_steps: int, lr: float,
             shots: int) -> dict:
    from vitscale.config import load_config
    from vitscale.eval.api import fewshot_checkpoint
    from vitscale.train import run

    row: dict = {"seed": seed, "wall_s": {}}
    encoders = {}
    for name, extra in PRETRAIN.items():
        start = time.perf_counter()
        result = run(load_config(None, [*ENCODER, *PRETRAIN_RECIPE, *extra, f"seed={seed}",
                                        f"epochs={pretrain_epochs:g}", "eval_every=200",
                                        "log_every=50", f"out_dir={out / f'{name}-{seed}'}"]))
        row["wall_s"][f"pretrain_{name}"] = round(time.perf_counter() - start, 1)
        row[f"{name}_pretrain_test_loss"] = result.metrics.get("test/loss")
        row[f"{name}_pretrain_test_accuracy"] = result.metrics.get("test/accuracy")
        encoders[name] = result.run_dir
        few = fewshot_checkpoint(result.run_dir, "digits", shots=[shots], seeds=5)
        row[f"{name}_{shots}shot"] = few["results"][0]["mean"]
    row[f"random_{shots}shot"] = random_init_fewshot(seed, shots)
    for name in ("scratch", *PRETRAIN):
        start = time.perf_counter()
        init = [f"model.init={encoders[name]}"] if name in encoders else []
        result = run(load_config(None, [*ENCODER, *FINETUNE, *init, f"seed={seed}",
                                        f"optim.lr={lr:g}", f"steps={finetune_steps}",
                                        f"eval_every={finetune_steps}", "log_every=50",
                                        f"out_dir={out / f'finetune-{name}-{seed}'}"]))
        row["wall_s"][f"finetune_{name}"] = round(time.perf_counter() - start, 1)
        row[f"{name}_finetune_test_accuracy"] = result.metrics["test/accuracy"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=float, default=100)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.001, help="fine-tuning learning rate")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pretrain"))
    parser.add_argument("--flops", action="store_true", help="only the FLOP comparison")
    args = parser.parse_args()
    if args.flops:
        flops()
        return
    started = time.perf_counter()
    rows = [one_seed(s, args.out, args.pretrain_epochs, args.finetune_steps, args.lr, args.shots)
            for s in args.seeds]
    k = args.shots
    print(f"\n| | fine-tuned, 10% of the labels (test acc.) | {k}-shot, frozen features |")
    print("|---|---|---|")
    for name, few in (("scratch", "random"), *((n, n) for n in PRETRAIN)):
        ft = [r[f"{name}_finetune_test_accuracy"] for r in rows]
        fs = [r[f"{few}_{k}shot"] for r in rows]
        print(f"| {name if name != 'scratch' else 'scratch / random init'} | {stat(ft)} | {stat(fs)} |")
    for name in PRETRAIN:
        gain = [r[f"{name}_finetune_test_accuracy"] - r["scratch_finetune_test_accuracy"] for r in rows]
        few_gain = [r[f"{name}_{k}shot"] - r[f"random_{k}shot"] for r in rows]
        print(f"{name}: fine-tuning gain per seed {[round(100 * g, 1) for g in gain]} points, "
              f"{k}-shot gain per seed {[round(100 * g, 1) for g in few_gain]} points")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
