"""`make tour`: a tour of the model family (`make demo` trains; see configs/demo.yaml)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vitscale.cli import main as cli
from vitscale.models import count, create_model, load, save


def tour() -> None:
    print("== named sizes (vitscale models) ==")
    cli(["models", "Ti/16", "S/16", "B/16", "L/16", "g/14", "22B/14"])

    print("\n== one config, every paper's variant ==")
    x = torch.randn(2, 3, 224, 224)
    variants = {
        "ViT (class token, learned posemb)": dict(),
        "Scaling ViT (MAP head, no class token)": dict(pool="map"),
        "big_vision GAP + sin-cos posemb": dict(pool="gap", posemb="sincos2d"),
        "ViT-22B (parallel, QK-norm, no biases)": dict(block="parallel", qk_norm=True,
                                                        qkv_bias=False, norm_bias=False),
    }
    for title, switches in variants.items():
        model = create_model("Ti/16", num_classes=10, **switches).eval()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(x)
        c = count(model.cfg)
        print(f"{title:42s} params {c.params / 1e6:5.2f}M  {c.gflops:5.2f} GFLOPs  "
              f"logits {tuple(logits.shape)}  {time.perf_counter() - start:.2f}s")

    print("\n== weights: save, reload, fine-tune at a higher resolution ==")
    with tempfile.TemporaryDirectory() as tmp:
        model = create_model("Ti/16", num_classes=10, img_size=224).eval()
        save(model, Path(tmp) / "ti16")
        again = load(Path(tmp) / "ti16").eval()
        with torch.no_grad():
            same = torch.equal(model(x), again(x))
        print(f"reloaded from {Path(tmp) / 'ti16'}: outputs identical = {same}")
        bigger = load(Path(tmp) / "ti16", img_size=384, num_classes=37)
        print(f"loaded at 384 px with a new 37-class head: pos_embed "
              f"{tuple(model.pos_embed.shape)} -> {tuple(bigger.pos_embed.shape)}, head zero-init "
              f"= {bool(torch.count_nonzero(bigger.head.weight) == 0)}")


def main() -> None:
    tour()


if __name__ == "__main__":
    main()
