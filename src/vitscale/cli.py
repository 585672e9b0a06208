"""The `vitscale` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vitscale.errors import ConfigError, UserError


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """['heads=6', 'pool=gap'] -> {'heads': 6, 'pool': 'gap'} (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad override {item!r}; write KEY=VALUE, e.g. pool=gap")
        out[key.strip()] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from vitscale.models import list_models, model_config
    from vitscale.models.counts import count

    rows = []
    names = args.names or list_models(args.patch)
    for name in names:
        cfg = model_config(name, img_size=args.img_size, num_classes=args.num_classes)
        c = count(cfg)
        rows.append(dict(
            name=name, width=cfg.width, depth=cfg.depth, mlp=cfg.mlp_dim, heads=cfg.heads,
            pool=cfg.pool, block=cfg.block, img=cfg.img_size[0], seq_len=cfg.seq_len,
            params_m=round(c.params / 1e6, 2), gflops=round(c.gflops, 2),
        ))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["name", "width", "depth", "mlp", "heads", "pool", "block", "img", "seq_len",
               "params_m", "gflops"]
    titles = ["model", "width", "depth", "MLP", "heads", "pool", "block", "img", "tokens",
              "params (M)", "GFLOPs"]
    table = [titles] + [[_fmt(r[h]) for h in headers] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for j, row in enumerate(table):
        print("  ".join(cell.rjust(widths[i]) if i else cell.ljust(widths[i])
                        for i, cell in enumerate(row)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nGFLOPs: 2 x multiply-accumulates of one forward pass of one {args.img_size}px "
          f"image; params include a {args.num_classes}-class head.")
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


# ---------------------------------------------------------------------------------- convert
FORMATS = ("vitscale", "timm", "npz", "hf")


def _guess_format(dst: str) -> str:
    suffix = Path(dst).suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".pth", ".pt", ".bin"):
        return "timm"
    return "vitscale"


def cmd_convert(args: argparse.Namespace) -> int:
    from vitscale.models import weights

    overrides = parse_assignments(args.set)
    if args.model:
        overrides["name"] = args.model
    if args.img_size:
        overrides["img_size"] = args.img_size
    model = weights.load(args.src, **overrides)
    fmt = args.to or _guess_format(args.dst)
    dst = Path(args.dst)
    if fmt == "vitscale":
        weights.save(model, dst)
    elif fmt == "timm":
        weights.save_timm(model, dst)
    elif fmt == "npz":
        from vitscale.models import bigvision

        bigvision.write_npz(model.cfg, model.state_dict(), dst, layout=args.layout)
    else:
        from vitscale.models import hf

        hf.write_transformers(model.cfg, model.state_dict(), dst)
    cfg = model.cfg
    print(f"wrote {fmt} checkpoint {dst} ({cfg.name}: width {cfg.width}, depth {cfg.depth}, "
          f"heads {cfg.heads}, {cfg.img_size[0]}x{cfg.img_size[1]} px, pool {cfg.pool}, "
          f"{cfg.num_classes} classes, {model.num_params():,} params)")
    return 0


# ---------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from vitscale.train import run

    result = run(args.config, args.overrides, resume=args.resume)
    if not result.is_main:  # data-parallel: rank 0 reports
        return 0
    print(f"run directory: {result.run_dir} ({result.step} steps, {result.wall_s:.0f} s)")
    ema_acc = result.metrics.get("ema/test/accuracy")
    if ema_acc is not None:
        print(f"test accuracy (EMA weights): {ema_acc:.4f}")
    acc = result.metrics.get("test/accuracy")
    if acc is not None:
        print(f"test accuracy: {acc:.4f}")  # the last line, for scripts
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitscale", description="Design, scale, train and evaluate Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list named model configurations with params and GFLOPs")
    p.add_argument("names", nargs="*", help="names such as B/16 R50+B/16 (default: all sizes)")
    p.add_argument("--patch", type=int, help="show every size at this patch size")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "convert", help="convert weights between vitscale, timm, big_vision .npz and HF formats",
        description="SRC: a vitscale folder/.safetensors, a timm state dict (.safetensors/.pth/"
        ".bin) or hub folder, a big_vision/AugReg .npz, a transformers ViT folder, or "
        "hf-hub:ORG/NAME[@REV]. DST format follows --to, else its suffix (.npz -> npz, .pth/.bin "
        "-> timm, otherwise vitscale).",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=FORMATS, help="output format")
    p.add_argument("--layout", choices=("augreg", "big_vision"), default="augreg",
                   help="npz key layout (default: augreg, as the AugReg/ViT releases)")
    p.add_argument("--model", help="named size for a bare timm state dict, e.g. S/16 (sets heads)")
    p.add_argument("--img-size", type=int, help="resample position embeddings to this resolution")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="model config fields, e.g. heads=6 num_classes=10")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a model (config YAML + key.sub=value overrides)",
                       description="Train as the config says. A run directory that already "
                       "holds checkpoints is resumed exactly from the latest one.")
    p.add_argument("--config", help="YAML config (see configs/); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=0.003 data.batch_size=64")
    p.add_argument("--resume", help="a checkpoint folder to resume from (default: the latest "
                   "checkpoint in out_dir, if any)")
    p.set_defaults(func=cmd_train)
    return parser


def _version() -> str:
    from vitscale import __version__

    return f"vitscale {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"vitscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
