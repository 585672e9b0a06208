"""Images/s of vitscale's ViT against the same timm model, measured alternately in one process.

    python benchmarks/throughput.py --models S/16 Ti/16 --img-size 224 --batch 16

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


def step(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        model.zero_grad(set_to_none=True)
        model(x).float().logsumexp(-1).mean().backward()
    else:
        with torch.inference_mode():
            model(x)
    return time.perf_counter() - start


def measure(name: str, img_size: int, batch: int, repeats: int, warmup: int) -> list[dict]:
    ours = create_model(model_config(name, img_size=img_size, num_classes=1000))
    theirs = timm_twin(name, img_size, 1000)
    load_state_dict_into(ours, theirs.state_dict(), ours.cfg)
    x = torch.randn(batch, 3, img_size, img_size)
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)
    rows = []
    for backward in (False, True):
        for m in (ours, theirs):
            m.train(backward)
            for _ in range(warmup):
                step(m, x, backward)
        t_ours, t_timm = [], []
        for i in range(repeats):
            # Alternate which model goes first so drift in machine load hits both alike.
            pair = [(ours, t_ours), (theirs, t_timm)]
            for model, times in pair if i % 2 == 0 else reversed(pair):
                times.append(step(model, x, backward))
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads")
    print("| model | img | batch | pass | vitscale img/s | timm img/s | ratio (ours/timm) "
          "| ratio IQR |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for r in measure(name, args.img_size, args.batch, args.repeats, args.warmup):
            print(f"| {r['model']} | {r['img']} | {r['batch']} | {r['mode']} | {r['ours']:.1f} "
                  f"| {r['timm']:.1f} | {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
