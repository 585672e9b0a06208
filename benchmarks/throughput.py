"""Images/s of vitscale's ViT against the same timm model, measured alternately in one process.

    python benchmarks/throughput.py --models S/16 Ti/16 --img-size 224 --batch 16
    python benchmarks/throughput.py --device cuda --precision bf16 --models B/16 L/16 --batch 128

Absolute times on shared machines are noise; the ratio (ours / timm, > 1 means we are faster)
from interleaved runs is the figure to read: the median of the per-pair ratios, with their
interquartile range to show how much of a difference is noise. Both models get identical weights, and their
outputs are checked equal before timing so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from vitscale.models import create_model, model_config
from vitscale.models.weights import load_state_dict_into

TIMM_NAMES = {"Ti": "tiny", "S": "small", "M": "medium", "B": "base", "L": "large", "H": "huge"}


def timm_twin(name: str, img_size: int, num_classes: int) -> torch.nn.Module:
    size, patch = name.split("/")
    return timm.create_model(f"vit_{TIMM_NAMES[size]}_patch{patch}_{img_size}", pretrained=False,
                             num_classes=num_classes, img_size=img_size)


def step(model: torch.nn.Module, x: torch.Tensor, backward: bool, dtype: torch.dtype | None) -> float:
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()  # time this step's kernels, not the previous one's
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if backward:
            model.zero_grad(set_to_none=True)
            model(x).float().logsumexp(-1).mean().backward()
        else:
            with torch.inference_mode():
                model(x)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, img_size: int, batch: int, repeats: int, warmup: int, device: str = "cpu",
            dtype: torch.dtype | None = None) -> list[dict]:
    ours = create_model(model_config(name, img_size=img_size, num_classes=1000))
    theirs = timm_twin(name, img_size, 1000)
    load_state_dict_into(ours, theirs.state_dict(), ours.cfg)
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    ours.eval(), theirs.eval()
    tf32 = torch.backends.cuda.matmul, torch.backends.cudnn
    for backend in tf32:
        backend.allow_tf32 = False
    with torch.inference_mode():  # in fp32: the same function before timing (on CUDA the
        # attention kernel picked for each memory layout moves logits by up to ~1e-3)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-3 if x.is_cuda else 1e-4, rtol=0)
    # Timed as people train on GPUs: fp32 matmuls and convolutions in TF32 (both models alike).
    for backend in tf32:
        backend.allow_tf32 = x.is_cuda
    rows = []
    for backward in (False, True):
        for m in (ours, theirs):
            m.train(backward)
            for _ in range(warmup):
                step(m, x, backward, dtype)
        t_ours, t_timm = [], []
        for i in range(repeats):
            # Alternate which model goes first so drift in machine load hits both alike.
            pair = [(ours, t_ours), (theirs, t_timm)]
            for model, times in pair if i % 2 == 0 else reversed(pair):
                times.append(step(model, x, backward, dtype))
        ratios = [b / a for a, b in zip(t_ours, t_timm)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        rows.append(dict(model=name, img=img_size, batch=batch,
                         mode="fwd+bwd" if backward else "forward",
                         ours=batch / statistics.median(t_ours),
                         timm=batch / statistics.median(t_timm),
                         ratio=statistics.median(ratios), q1=q1, q3=q3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["S/16", "Ti/16"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: autocast, as `vitscale train precision=bf16`")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        where = f"{torch.get_num_threads()} threads"
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    print(f"torch {torch.__version__}, timm {timm.__version__}, {where}, {args.precision}")
    print("| model | img | batch | pass | vitscale img/s | timm img/s | ratio (ours/timm) "
          "| ratio IQR |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for r in measure(name, args.img_size, args.batch, args.repeats, args.warmup, args.device,
                         dtype):
            print(f"| {r['model']} | {r['img']} | {r['batch']} | {r['mode']} | {r['ours']:.1f} "
                  f"| {r['timm']:.1f} | {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
