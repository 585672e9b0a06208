"""The `vitscale` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from vitscale.errors import ConfigError, UserError


# ---------------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from vitscale.models import list_models, model_config
    from vitscale.models.asvit import ASVIT_MODELS, asvit_config, asvit_counts, stage_grids
    from vitscale.models.counts import count
    from vitscale.models.registry import is_asvit

    rows = []
    names = args.names or [*list_models(args.patch), *([] if args.patch else ASVIT_MODELS)]
    for name in names:
        if is_asvit(name):
            a = asvit_config(name.removeprefix("asvit:"), img_size=args.img_size,
                             num_classes=args.num_classes)
            c = asvit_counts(a)
            rows.append(dict(
                name=name, width=a.width, depth=sum(a.depths), mlp="x" + "/".join(map(str, a.expansions)),
                heads=a.heads, pool="gap", block="window", img=args.img_size,
                seq_len=sum(h * w for h, w in stage_grids(a)), params_m=round(c.params / 1e6, 2),
                gflops=round(c.gflops, 2)))
            continue
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
    _table(titles, [[_fmt(r[h]) for h in headers] for r in rows])
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
    from vitscale.config import parse_model_settings
    from vitscale.models import weights

    overrides = parse_model_settings(args.set)
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

    return _report_run(run(args.config, args.overrides, resume=args.resume))


def cmd_distill(args: argparse.Namespace) -> int:
    from vitscale.train import run

    teachers = "[" + ", ".join(json.dumps(str(t)) for t in args.teacher) + "]"
    overrides = ["objective=distill", f"distill.teachers={teachers}", *args.overrides]
    return _report_run(run(args.config, overrides, resume=args.resume))


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vitscale.train import run

    overrides = [f"objective={args.objective}", *args.overrides]
    return _report_run(run(args.config, overrides, resume=args.resume))


def cmd_sweep(args: argparse.Namespace) -> int:
    from vitscale.scaling.sweep import parse_center, run_sweep, sweep_points

    center = parse_center(args.star) if args.star else None
    points = sweep_points(args.grid or [], center)
    rows = run_sweep(args.config, points, args.out, jobs=args.jobs, overrides=args.overrides,
                     center=center)
    done = sum(r["status"] == "done" for r in rows)
    print(f"sweep {args.out}: {done} of {len(rows)} runs done; index {Path(args.out) / 'sweep.jsonl'}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from vitscale.scaling import study

    if args.action == "fit":
        fit, json_path, png = study.fit_runs(args.source, args.metric, args.x, args.out,
                                             bootstrap=args.bootstrap, max_x=args.max_x)
        if args.json:
            print(json.dumps({k: v for k, v in fit.to_dict().items() if k != "bootstrap"}))
            return 0
        iv = fit.intervals
        print(f"{fit.meta['metric']} = {fit.a:.4g} ({args.x} + {fit.d:.4g})^-{fit.b:.4g} + "
              f"{fit.c:.4g}   ({len(fit.x)} frontier points of {fit.meta['points']}, rms log "
              f"residual {fit.rms_log_residual:.3g})")
        for name in ("a", "b", "c", "d"):
            if name in iv:
                print(f"  {name}: {getattr(fit, name):.4g}  90% interval [{iv[name][0]:.4g}, "
                      f"{iv[name][1]:.4g}]")
        if fit.at_bounds:
            print(f"warning: {', '.join(fit.at_bounds)} at the bound of the fit: these points do "
                  "not determine the law well (more compute range, more runs)")
        print(f"wrote {json_path} and {png}")
        return 0
    if args.action == "predict":
        fit = study.read_fit(args.source)
        if (args.compute is None) == (args.error is None):
            raise UserError("vitscale scaling predict needs one of --compute C or --error E")
        if args.compute is not None:
            import numpy as np

            value = fit.predict(args.compute)
            lo, hi = fit.band(np.array([args.compute]))
            out = {"compute": args.compute, "error": value, "interval": [float(lo[0]), float(hi[0])]}
            text = (f"error at {args.compute:g}: {value:.4f} (90% band {out['interval'][0]:.4f} - "
                    f"{out['interval'][1]:.4f})")
        else:
            value = fit.compute_for(args.error)
            out = {"error": args.error, "compute": value}
            text = f"compute for error {args.error:g}: {value:.4g}"
        print(json.dumps(out) if args.json else text)
        return 0
    # shape
    from vitscale.scaling.shape import SOVIT_EXPONENTS, scale_shape

    if args.from_model:
        shape = _shape_of(args.from_model)
        exponents = dict(SOVIT_EXPONENTS)
        if args.exponents:
            values = [float(v) for v in args.exponents.split(",")]
            if len(values) != 3:
                raise UserError("--exponents takes three numbers: width,depth,mlp_dim")
            exponents = dict(zip(("width", "depth", "mlp_dim"), values))
        if args.ratio is None or args.ratio <= 0:
            raise UserError("vitscale scaling shape --from MODEL needs --ratio R > 0 (the compute "
                            "increase to spend)")
        scaled = scale_shape(shape, args.ratio, exponents)
        out = {"from": shape, "ratio": args.ratio, "exponents": exponents, "shape": scaled}
        print(json.dumps(out) if args.json else
              f"x{args.ratio:g} compute: " + ", ".join(f"{k} {shape[k]:g} -> {scaled[k]:.1f}"
                                                       for k in shape))
        return 0
    if not args.source or args.compute is None:
        raise UserError("vitscale scaling shape takes a star sweep DIR and --compute C, or "
                        "--from MODEL --ratio R")
    result = study.shape_study(args.source, args.compute, args.metric)
    if args.json:
        print(json.dumps(result))
        return 0
    print("compute-optimal exponents s_k (x* grows as C^s_k): " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["exponents"].items()))
    print(f"at {args.compute:g} FLOPs: " + ", ".join(
        f"{k} {v:.1f}" for k, v in result["optimal"].items()))
    cfg = " ".join(f"model.overrides.{k}={v}" for k, v in result["model.overrides"].items())
    print(f"vitscale train --config {result['config'] or 'BASE.yaml'} {cfg}")
    return 0


def _shape_of(model: str) -> dict[str, float]:
    """{width, depth, mlp_dim} of a named size or of 'width=W,depth=D,mlp_dim=M'."""
    if "=" in model:
        from vitscale.scaling.sweep import parse_center

        return {k: float(v) for k, v in parse_center(model).items()}
    from vitscale.models.registry import model_config

    cfg = model_config(model)
    return {"width": float(cfg.width), "depth": float(cfg.depth), "mlp_dim": float(cfg.mlp_dim)}


def _report_run(result) -> int:
    from vitscale.config import PRETRAINING_OBJECTIVES

    if not result.is_main:  # data-parallel: rank 0 reports
        return 0
    print(f"run directory: {result.run_dir} ({result.step} steps, {result.wall_s:.0f} s)")
    if result.objective in PRETRAINING_OBJECTIVES:  # no classifier: the objective's own numbers
        loss = result.metrics.get("test/loss")
        if loss is not None:
            print(f"test {result.objective} loss: {loss:.4f}")
        else:
            print(f"no test split: the {result.objective} loss on minival is in "
                  f"{result.run_dir / 'metrics.jsonl'}")
        acc = result.metrics.get("test/accuracy")
        if acc is not None:
            print(f"test {result.objective} accuracy (masked patches' targets): {acc:.4f}")
        print(f"encoder: {result.run_dir / 'model'} (vitscale finetune / fewshot / linear-probe, "
              "model.init)")
        return 0
    ema_acc = result.metrics.get("ema/test/accuracy")
    if ema_acc is not None:
        print(f"test accuracy (EMA weights): {ema_acc:.4f}")
    acc = result.metrics.get("test/accuracy")
    if acc is not None:
        print(f"test accuracy: {acc:.4f}")  # the last line, for scripts
    agreement = result.metrics.get("test/agreement")
    if agreement is not None:  # a distillation run: top-1 agreement with the teacher(s)
        print(f"teacher test accuracy: {result.metrics['test/teacher_accuracy']:.4f}")
        print(f"agreement: {agreement:.4f}")
    return 0


# ---------------------------------------------------------------------------------- detection
def cmd_detect(args: argparse.Namespace) -> int:
    from vitscale.detection.train import evaluate_run, train_detector

    if args.action == "train":
        overrides = ([f"data.train={args.data}"] if args.data else []) + list(args.overrides)
        result = train_detector(args.config, overrides, resume=args.resume)
        print(f"run directory: {result.run_dir} ({result.step} steps, {result.wall_s:.0f} s)")
        _print_map(result.metrics)
        return 0
    metrics, path = evaluate_run(args.run_dir, args.data, batch_size=args.batch_size,
                                 device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{args.run_dir} (step {metrics['step']}) on {metrics['data']} "
          f"({metrics['images']} images); written to {path}")
    _print_map(metrics)
    return 0


def _print_map(m: dict[str, Any]) -> None:
    print(f"box AP {m['ap']:.4f}  AP50 {m['ap50']:.4f}  AP75 {m['ap75']:.4f}")


# ---------------------------------------------------------------------------------- evaluation
def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    values = _floats(text, what)
    if any(v != int(v) for v in values):
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}")
    return [int(v) for v in values]


def _cache(args: argparse.Namespace):
    from vitscale.eval import FeatureCache

    return FeatureCache(args.cache_dir, enabled=not args.no_cache)


def _table(titles: list[str], rows: list[list[Any]]) -> None:
    """A plain-text table: the first column left-aligned, the others right-aligned; floats
    that are not already strings get 4 decimals."""
    table = [titles] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row]
                        for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(titles))]
    for j, row in enumerate(table):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def cmd_eval(args: argparse.Namespace) -> int:
    from vitscale.eval import evaluate_checkpoint
    from vitscale.eval.api import output_dir_for

    out = None if args.no_save else Path(args.out) if args.out else output_dir_for(args.checkpoint)
    m = evaluate_checkpoint(args.checkpoint, args.data, img_size=args.img_size, split=args.split,
                            batch_size=args.batch_size, out_dir=out, loss=args.loss,
                            patch=args.patch)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['checkpoint']} on {m['data']} ({m['split']}, {m['n']} images, {m['img_size']} px)")
    print(f"top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  ECE (15 bins) {m['ece']:.4f}  "
          f"{m['images_per_s']:.0f} images/s")
    _table(["class", "accuracy"], [[str(k), v] for k, v in m["per_class"].items()])
    if "reliability_png" in m:
        print(f"reliability diagram: {m['reliability_png']} (numbers: {m['json']})")
    elif out is None and not args.no_save:
        print("nothing written: pass --out DIR for the metrics JSON and reliability diagram")
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from vitscale.eval import fewshot_checkpoint

    out = fewshot_checkpoint(args.checkpoint, args.data, shots=_ints(args.shots, "--shots"),
                             seeds=args.seeds, l2=_floats(args.l2, "--l2"), img_size=args.img_size,
                             cache=_cache(args), patch=args.patch)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"few-shot linear regression on {out['data']}: {out['num_train']} train / "
          f"{out['num_test']} test features ({out['features_s']:.1f} s), {args.seeds} draws each")
    _table(["shots", "l2", "accuracy", "std", "per draw"],
           [[str(r["shots"]), f"{r['l2']:g}", r["mean"], r["std"],
             " ".join(f"{a:.3f}" for a in r["accuracies"])] for r in out["results"]])
    return 0


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from vitscale.eval import linear_probe_checkpoint

    res = linear_probe_checkpoint(args.checkpoint, args.data, wds=_floats(args.wd, "--wd"),
                                  img_size=args.img_size, cache=_cache(args), patch=args.patch)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
        return 0
    _table(["weight decay", "minival accuracy"],
           [[f"{wd:g}" + (" *" if wd == res.wd else ""), acc] for wd, acc in res.sweep.items()])
    print(f"linear probe test accuracy: {res.test_accuracy:.4f} (weight decay {res.wd:g})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from vitscale.train import finetune, finetune_sweep

    kw = dict(img_size=args.img_size, config=args.config, keep_head=args.keep_head,
              patch=args.patch)
    lrs = _floats(args.lr, "--lr") if args.lr else []
    if len(lrs) <= 1:
        overrides = [*args.overrides, *(f"optim.lr={lr}" for lr in lrs)]
        return _report_run(finetune(args.checkpoint, args.data, overrides=overrides, **kw))
    result, rows = finetune_sweep(args.checkpoint, args.data, lrs, overrides=args.overrides, **kw)
    if result.is_main:
        _table(["lr", "minival accuracy", "run directory"],
               [[f"{r['lr']:g}" + (" *" if r["chosen"] else ""), r["minival_accuracy"],
                 r["run_dir"]] for r in rows])
    return _report_run(result)


def cmd_select(args: argparse.Namespace) -> int:
    from vitscale.eval import rank_checkpoints
    from vitscale.train import finetune

    rows = rank_checkpoints(args.checkpoints, args.data, by=args.by, shots=args.shots,
                            cache=_cache(args))
    _table(["rank", "checkpoint", "model", "params (M)", "metric", "score"],
           [[str(i + 1), r["checkpoint"], r["model"], _fmt(r["params"] / 1e6), r["metric"], r["score"]]
            for i, r in enumerate(rows)])
    best = rows[0]["checkpoint"]
    if args.no_finetune:
        print(f"best: {best}")
        return 0
    print(f"fine-tuning the best, {best}")
    return _report_run(finetune(best, args.data, img_size=args.img_size, overrides=args.overrides))


def cmd_search(args: argparse.Namespace) -> int:
    from vitscale.search.reinforce import SearchSettings, random_topologies, run_search

    settings = SearchSettings(steps=args.steps, img_size=args.img_size, width=args.width,
                              batch=args.batch, repeats=args.repeats, n_theta=args.n_theta,
                              seed=args.seed, data=args.data)
    if args.random:
        rows = random_topologies(args.random, settings, args.out)
        print(f"{len(rows)} random topologies: {args.out}/random.json, "
              f"{args.out}/random_topology.yaml")
        return 0
    result = run_search(settings, args.out)
    print(f"searched topology: {result.topology.arch()}")
    print(f"train it: vitscale train --config {result.out_dir / 'topology.yaml'} data.source=...")
    return 0


def _topology(text: str):
    """An As-ViT topology from a name, an arch string or a topology.yaml (vitscale search)."""
    from vitscale.models.asvit import asvit_config

    if text.endswith((".yaml", ".yml")):
        from vitscale.config import load_config

        name = load_config(text).model.name
        if not name.startswith("asvit"):
            raise ConfigError(f"{text} names model {name!r}, not an As-ViT topology")
        text = name
    return asvit_config(text.removeprefix("asvit:"))


def cmd_autoscale(args: argparse.Namespace) -> int:
    from vitscale.search.autoscale import ScaleSettings, autoscale, parse_sizes

    if bool(args.target_params) == bool(args.target_gflops):
        raise ConfigError("give exactly one of --target-params (e.g. 30M,50M) or --target-gflops")
    by = "params" if args.target_params else "gflops"
    targets = parse_sizes(args.target_params or args.target_gflops)
    settings = ScaleSettings(targets=targets, by=by, start_width=args.start_width,
                             proxy_ratio=args.proxy_ratio, img_size=args.img_size,
                             count_img_size=args.count_img_size, batch=args.batch,
                             repeats=args.repeats, n_theta=args.n_theta, seed=args.seed,
                             data=args.data)
    topology = _topology(args.topology)
    runs = [("", settings)]
    if args.random:
        runs = [(f"random-{k}", dataclasses.replace(settings, random=True, seed=k))
                for k in range(args.random)]
    for sub, s in runs:
        out = Path(args.out) / sub if sub else Path(args.out)
        result = autoscale(topology, s, out)
        _table(["step", "depths", "width", "params (M)", "GFLOPs", "kappa", "L^E"],
               [[str(r["step"]), ",".join(map(str, r["depths"])), str(r["width"]),
                 _fmt(r["params"] / 1e6), _fmt(r["gflops"]),
                 "-" if r["kappa"] is None else f"{r['kappa']:.3g}",
                 "-" if r["length"] is None else f"{r['length']:.4g}"] for r in result.trajectory])
        for label, r in result.picks.items():
            print(f"{label}: {r['arch']} ({r['params'] / 1e6:.1f}M params, {r['gflops']:.2f} "
                  f"GFLOPs) -> {out / f'asvit-{label}.yaml'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from vitscale.analysis import analyze_checkpoint, parse_what

    what = parse_what(args.what)  # an unknown name fails before the checkpoint is loaded
    res = analyze_checkpoint(args.checkpoint, args.data, what, images=args.images,
                             out_dir=args.out, img_size=args.img_size, baseline=args.baseline,
                             ig_steps=args.ig_steps, rollout_variant=args.rollout,
                             robust_images=args.robust_images)
    if args.json:
        doc = {k: v for k, v in res.items() if k not in ("distance",)}
        if "distance" in res:
            doc["distance"] = res["distance"]["distance"]
            doc["distance_summary"] = {k: v for k, v in res["distance"].items() if k != "distance"}
        print(json.dumps(doc))
        return 0
    print(f"{res['checkpoint']} on {res['data']}: files in {res['out_dir']}")
    for name, why in res["skipped"].items():
        print(f"  {name}: skipped ({why})")
    if "filters" in res:
        ex = res["filters"]["explained"]
        print(f"  filters: top {len(ex)} components explain {sum(ex):.1%} of the kernel variance")
    if "posemb" in res:
        print(f"  posemb: {res['posemb']['kind']} table on a {res['posemb']['grid']} grid")
    if "distance" in res:
        d = res["distance"]
        rho = "n/a" if d["spearman"] is None else f"{d['spearman']:.2f}"
        print(f"  distance (px, mean over heads, by layer): "
              f"{' '.join(f'{v:.1f}' for v in d['layer_mean'])}; Spearman with depth {rho}")
    if "rollout" in res:
        print(f"  rollout: {res['rollout']['variant']} variant, rows sum to 1 within "
              f"{res['rollout']['max_row_sum_error']:.1e}")
    if "ig" in res:
        print(f"  ig: {res['ig']['baseline']} baseline, {res['ig']['steps']} steps, completeness gap "
              f"at most {res['ig']['max_relative_gap']:.1e} of |F(x) - F(baseline)|")
    if "robustness" in res:
        r = res["robustness"]
        print(f"  robustness on {r['n']} {res['split']} images (accuracy / ECE by severity 1-5; "
              f"clean {r['clean']['accuracy']:.3f} / {r['clean']['ece']:.3f}):")
        _table(["corruption", *[str(s) for s in range(1, 6)]],
               [[name, *[f"{x['accuracy']:.3f} / {x['ece']:.3f}" for x in rows]]
                for name, rows in r["corruptions"].items()])
    return 0


def _add_data_args(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("checkpoint", help="any checkpoint `vitscale convert` reads, or a run directory")
    p.add_argument("--data", required=True, help="data source: digits, imagefolder:PATH, hf:NAME, ...")
    p.add_argument("--img-size", type=int, help="evaluate at this resolution (posemb resampled)")
    p.add_argument("--patch", type=int, help="patch size at that resolution (kernel PI-resized, "
                   "FlexiViT); e.g. 6 for a /4 model at 1.5x keeps its token grid")
    p.add_argument("--json", action="store_true", help="print JSON")
    if cache:
        p.add_argument("--cache-dir", help="feature cache (default ~/.cache/vitscale/features or "
                       "$VITSCALE_CACHE/features)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")


def cmd_plan(args: argparse.Namespace) -> int:
    from vitscale.plan import plan
    from vitscale.plan.report import render

    if args.table:
        from vitscale.plan.table import plan_table, render_table

        table = plan_table([args.model] if args.model else None, batch=args.batch,
                           precision=args.precision, optim=args.optim, kernel=args.kernel,
                           device_memory=args.device_memory or "80GiB", margin=args.margin,
                           img_size=args.img_size, num_classes=args.num_classes)
        print(json.dumps(table) if args.json else
              f"smallest layout that fits {args.device_memory or '80GiB'} per device, {args.batch} images "
              f"per device, {args.optim}, {args.precision} (ddp / fsdpN / hsdpRxN / tpN, +ac: "
              f"activation checkpointing, -: none fits):\n" + render_table(table))
        return 0
    config = args.config or (args.model if args.model and
                             args.model.endswith((".yaml", ".yml")) else None)
    if config:
        from vitscale.plan.planner import plan_config

        result = plan_config(config, args.set, devices=args.devices,
                             device_memory=args.device_memory, margin=args.margin,
                             num_classes=args.num_classes if args.num_classes != 1000 else None,
                             kernel=args.kernel, gpu=args.gpu, peak_tflops=args.peak_tflops,
                             mfu=args.mfu)
        print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
        return 0
    if not args.model:
        raise UserError("vitscale plan needs a MODEL (e.g. B/16), --config FILE.yaml or --table")
    result = plan(args.model, img_size=args.img_size, batch=args.batch, precision=args.precision,
                  optim=args.optim, dp_shard=args.dp_shard, tp=args.tp,
                  dp_replicate=args.dp_replicate, act_ckpt=args.act_ckpt,
                  param_dtype=args.param_dtype, reduce_dtype=args.reduce_dtype,
                  sequence_parallel=args.sequence_parallel, kernel=args.kernel,
                  device_memory=args.device_memory or "80GiB", margin=args.margin,
                  num_classes=args.num_classes, gpu=args.gpu, peak_tflops=args.peak_tflops,
                  mfu=args.mfu, accum_steps=args.accum_steps)
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
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

    p = sub.add_parser("plan", help="per-device memory (params, grads, optimizer, FSDP, "
                       "activations), whether it fits, the largest batch, FLOPs per step")
    p.add_argument("model", nargs="?", help="a named size (B/16, 22B/14), asvit-*, a config "
                   "YAML or a checkpoint")
    p.add_argument("--table", action="store_true", help="named sizes x 1..1024 devices: the "
                   "smallest layout that fits each")
    p.add_argument("--config", help="plan a training config as `vitscale train` runs it")
    p.add_argument("--devices", type=int, help="with --config: the process count (default: "
                   "the config's `# vitscale plan: N devices x MEM` comment)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="with --config: overrides, e.g. accum_steps=2")
    p.add_argument("--img-size", type=int, help="resolution (default: the model's, 224)")
    p.add_argument("--batch", type=int, default=32, help="images per device per micro-batch")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="bf16: autocast, as `precision: bf16` in a training config")
    p.add_argument("--optim", choices=("adamw", "adam_bf16", "adafactor_bv", "sgd"),
                   default="adamw")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps "
                   "(gradients are then held through the peak)")
    p.add_argument("--dp-shard", type=int, default=1, help="FSDP2 degree")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--dp-replicate", type=int, default=1, help="DDP / HSDP replicas")
    p.add_argument("--act-ckpt", default="none", help="activation checkpointing: none, full, "
                   "every:K")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="FSDP's gathered parameters (parallel.param_dtype)")
    p.add_argument("--reduce-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--kernel", choices=("flash", "math"), default="flash",
                   help="attention kernel: fused (flash / efficient / cuDNN) or math")
    p.add_argument("--device-memory", help="e.g. 80GiB, 40GB, 24GiB (default 80GiB, or what "
                   "a --config states)")
    p.add_argument("--margin", type=float, default=0.10, help="memory kept free (fraction)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--gpu", help="device name for the peak FLOP/s (H100-SXM, A100-80GB, ...)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 dense TFLOP/s")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the "
                   "time per step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train a model (config YAML + key.sub=value overrides)",
                       description="Train as the config says. A run directory that already "
                       "holds checkpoints is resumed exactly from the latest one.")
    p.add_argument("--config", help="YAML config (see configs/); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=0.003 data.batch_size=64")
    p.add_argument("--resume", help="a checkpoint folder to resume from (default: the latest "
                   "checkpoint in out_dir, if any)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("detect", help="object detection: a torchvision detector on a ViT "
                       "(simple feature pyramid) or As-ViT (FPN) backbone, COCO box mAP",
                       description="train: Faster R-CNN / RetinaNet on COCO-format data "
                       "(coco:IMAGES_DIR,ANNOTATIONS.json) with the trainer's run directory, "
                       "resume and metrics.jsonl; eval: COCO box mAP of a run's newest checkpoint. "
                       "Needs pycocotools (pip install 'vitscale[detection]').")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("train", help="train a detector (config YAML + key.sub=value overrides)")
    q.add_argument("--config", help="YAML config of DetectConfig's sections; defaults when omitted")
    q.add_argument("--data", help="training data coco:IMAGES_DIR,ANNOTATIONS.json (data.train)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. model.name=S/16 optim.layer_decay=0.7 steps=500")
    q.add_argument("--resume", help="a checkpoint folder to resume from (default: the latest "
                   "checkpoint in out_dir, if any)")
    q = actions.add_parser("eval", help="COCO box mAP of a detection run")
    q.add_argument("run_dir", help="a `vitscale detect train` run directory")
    q.add_argument("--data", help="coco:IMAGES_DIR,ANNOTATIONS.json (default: the run's data.val, "
                   "else data.train)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("distill", help="train a student on frozen teachers (function matching, "
                       "DeiT token, features)",
                       description="Knowledge distillation with the trainer of `vitscale train` "
                       "(run directory, resume, metrics, torchrun): objective=distill with the "
                       "teachers given; distill.* settings choose the mode (function_matching, "
                       "token, features), temperature, teacher_img_size, consistent.")
    p.add_argument("--teacher", action="append", required=True, metavar="CKPT",
                   help="a teacher checkpoint (vitscale run, timm, big_vision .npz, transformers); "
                   "repeat for an ensemble (probabilities averaged)")
    p.add_argument("--config", help="the student's training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. distill.temperature=2 distill.mode=token")
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("pretrain", help="self-supervised pre-training without labels: masked "
                       "patch prediction (ViT paper) or MAE",
                       description="The trainer of `vitscale train` (run directory, resume, "
                       "metrics, torchrun) with objective=mpp or mae: labels are never read, so a "
                       "flat folder of images works (imagefolder:PATH). mpp.* / mae.* settings: "
                       "corruption rate and split, target, mask ratio, decoder. The run's model/ "
                       "is an encoder that finetune, fewshot, linear-probe and model.init read.")
    p.add_argument("--objective", choices=("mpp", "mae"), default="mpp")
    p.add_argument("--config", help="the encoder's training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. mpp.target=patch4x4_3bit mae.mask_ratio=0.6")
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sweep", help="one training run per grid (or SoViT star) point, resumable",
                       description="Train every point of a grid of config overrides into "
                       "OUT/<point>; re-running the command skips finished runs and resumes "
                       "unfinished ones. Index: OUT/sweep.jsonl.")
    p.add_argument("--config", help="the base training config (YAML)")
    p.add_argument("--grid", action="append", metavar="KEY=[V1,V2,...]",
                   help="an axis, e.g. 'model.name=[Ti/4,S/4]' or 'epochs=[5,10,20]'; repeat")
    p.add_argument("--star", metavar="width=W,depth=D,mlp_dim=M",
                   help="SoViT's star sweep: vary each model.overrides.width / depth / mlp_dim "
                   "axis alone around this centre (crossed with the other axes)")
    p.add_argument("--out", required=True, help="the sweep directory")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (subprocesses)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings for every run")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("scaling", help="saturating power-law fit / prediction, SoViT shape",
                       description="fit: E = a (C + d)^-b + c on the Pareto frontier of a sweep's "
                       "runs (or a compute,error CSV), with bootstrap 90%% intervals, fit.json "
                       "and fit.png; predict: the error at a compute or the compute for an error; "
                       "shape: SoViT's compute-optimal width / depth / MLP from a star sweep, or a "
                       "model scaled by ratio^(s_k / 3).")
    p.add_argument("action", choices=("fit", "predict", "shape"))
    p.add_argument("source", nargs="?", help="fit: a sweep / run DIR or FILE.csv; predict: "
                   "FIT.json; shape: a star sweep DIR")
    p.add_argument("--metric", default="minival/error",
                   help="minival/error (default), test/error, fewshot/10shot_error, ...")
    p.add_argument("--x", default="compute", choices=("compute", "params", "images"))
    p.add_argument("--out", help="fit: where fit.json / fit.png go (default: beside the data)")
    p.add_argument("--bootstrap", type=int, default=300, help="resamples for the intervals")
    p.add_argument("--max-x", type=float, help="fit only points up to this x")
    p.add_argument("--compute", type=float, help="predict / shape: a compute in FLOPs")
    p.add_argument("--error", type=float, help="predict: the compute needed for this error")
    p.add_argument("--from", dest="from_model", help="shape: a named size or "
                   "width=W,depth=D,mlp_dim=M to scale")
    p.add_argument("--ratio", type=float, help="shape --from: the compute increase")
    p.add_argument("--exponents", help="shape --from: s_width,s_depth,s_mlp (default SoViT's "
                   "0.22,0.45,0.6)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("eval", help="top-1/top-5, per-class accuracy, calibration (ECE) of a checkpoint")
    _add_data_args(p, cache=False)
    p.add_argument("--split", choices=("test", "minival", "train"), help="default: test, else minival")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", metavar="DIR", help="where eval-<data>-<split>-<img>px.json and the "
                   "reliability diagram (.png) go (default: the checkpoint's run directory)")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--loss", choices=("softmax", "sigmoid"), default="softmax",
                   help="how the head was trained: confidence is max softmax or max sigmoid")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fewshot", help="few-shot linear regression on frozen features (big_vision)")
    _add_data_args(p)
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated, default 1,5,10,25")
    p.add_argument("--seeds", type=int, default=3, help="random draws of the shots (default 3)")
    p.add_argument("--l2", default="1024", help="ridge regularisation, comma-separated to sweep")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("linear-probe", help="logistic regression on frozen features, wd swept on minival")
    _add_data_args(p)
    p.add_argument("--wd", default="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1", help="weight decays to sweep")
    p.set_defaults(func=cmd_linear_probe)

    p = sub.add_parser("analyze", help="what a ViT learned and why it predicts: embedding "
                       "filters, posemb similarity, attention distance, rollout, IG, robustness",
                       description="Each analysis writes <what>.png and <what>.json into --out "
                       "(default: the checkpoint's run directory /analysis). Without --what, every "
                       "analysis that applies to the model runs; the others are noted.")
    p.add_argument("checkpoint", help="any checkpoint `vitscale convert` reads, or a run directory")
    p.add_argument("--data", required=True, help="data source: digits, imagefolder:PATH, hf:NAME, ...")
    p.add_argument("--what", help="comma-separated: filters,posemb,distance,rollout,ig,robustness "
                   "(default: all that apply)")
    p.add_argument("--images", type=int, default=8, help="test images for distance, rollout and "
                   "ig (default 8)")
    p.add_argument("--robust-images", type=int, help="robustness on the first N test images "
                   "(default: the whole test split)")
    p.add_argument("--out", metavar="DIR", help="where the PNGs and JSONs go")
    p.add_argument("--img-size", type=int, help="analyse at this resolution (posemb resampled)")
    p.add_argument("--baseline", choices=("black", "blur"), default="black", help="IG baseline")
    p.add_argument("--ig-steps", type=int, default=64, help="IG integration points (default 64)")
    p.add_argument("--rollout", choices=("auto", "cls", "gap"), default="auto",
                   help="rollout of the class token's row or the patches' mean (auto: the "
                   "model's pooling)")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint (new zero head, posemb resampled)",
                       description="The ViT paper's recipe unless overridden: SGD momentum 0.9, "
                       "no weight decay, warmup + cosine, clipping at 1, Polyak averaging.")
    _add_data_args(p, cache=False)
    p.add_argument("--config", help="YAML with fine-tuning settings (applied over the defaults)")
    p.add_argument("--keep-head", action="store_true", help="keep the head (same classes)")
    p.add_argument("--lr", help="learning rate; comma-separated to run each and keep the one "
                   "whose last weights score best on minival (the ViT paper: 0.001,0.003,0.01,0.03)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for vitscale train")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("select", help="rank checkpoints by upstream validation, fine-tune the best")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--by", choices=("auto", "minival", "fewshot"), default="auto",
                   help="auto: the head's minival accuracy when classes match, else few-shot")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--img-size", type=int, help="fine-tuning resolution")
    p.add_argument("--no-finetune", action="store_true", help="only rank")
    p.add_argument("--cache-dir")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fine-tuning overrides")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("search", help="As-ViT training-free topology search (REINFORCE on L^E and "
                       "NTK kappa at init)", description="Resumable: run the same command again "
                       "(with more --steps) to continue. Writes search.json, search.png and "
                       "topology.yaml (for vitscale train --config) into --out.")
    p.add_argument("--out", default="runs/search", help="output folder (default runs/search)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--img-size", type=int, default=64, help="candidate resolution (paper: 224)")
    p.add_argument("--width", type=int, default=32, help="candidate width C (one block a stage)")
    p.add_argument("--batch", type=int, default=8, help="images for the NTK (default 8; paper 16)")
    p.add_argument("--repeats", type=int, default=16,
                   help="initialisations averaged per measure (default 16; paper 3-5): fewer "
                   "make kappa mostly initialisation noise, see docs/benchmarks.md")
    p.add_argument("--n-theta", type=int, default=10, help="points on the input circle")
    p.add_argument("--data", default="digits", help="source of the NTK batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", type=int, metavar="N",
                   help="instead: measure N uniformly random topologies (the paper's baseline)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("autoscale", help="grow an As-ViT topology into sizes without training",
                       description="TOPOLOGY: asvit-seed, an arch string 'K,S,E|...|H' or a "
                       "topology.yaml from vitscale search. Writes autoscale.json, autoscale.png "
                       "and asvit-<target>.yaml per target into --out.")
    p.add_argument("topology")
    p.add_argument("--target-params", help="e.g. 30M,50M,90M")
    p.add_argument("--target-gflops", help="e.g. 5,9,22 (at --count-img-size)")
    p.add_argument("--out", default="runs/autoscale")
    p.add_argument("--start-width", type=int, default=32)
    p.add_argument("--proxy-ratio", type=float, default=0.25,
                   help="measure candidates at this fraction of their width (public code: 1/4)")
    p.add_argument("--img-size", type=int, default=32, help="resolution of the measures")
    p.add_argument("--count-img-size", type=int, default=224, help="resolution GFLOPs are counted at")
    p.add_argument("--batch", type=int, default=8, help="images for the NTK (default 8)")
    p.add_argument("--repeats", type=int, default=16, help="initialisations per measure (default 16)")
    p.add_argument("--n-theta", type=int, default=10, help="points on the input circle")
    p.add_argument("--data", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", type=int, metavar="N",
                   help="instead: N random-scaling trajectories (the paper's baseline)")
    p.set_defaults(func=cmd_autoscale)
    return parser


def _version() -> str:
    from vitscale import __version__

    return f"vitscale {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may follow options (`finetune CKPT --data X steps=10`), which
        # argparse does not take into a positional list once that list was passed.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
