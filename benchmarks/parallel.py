"""Scale-out on CPU processes: per-rank memory of DDP, FSDP2 and tensor parallelism, and the step
time of FSDP2 against DDP, each layout one torchrun launch (gloo, OMP_NUM_THREADS=1).

    python benchmarks/parallel.py             # ViT-B/16 at 224 px, 1000 classes (5-11 min, 2 cores)
    python benchmarks/parallel.py --quick     # Ti/16 (4 heads) at 64 px, 10 classes: a smoke test
    python benchmarks/parallel.py --optimizers adamw --layouts ddp2 fsdp2 --skip-timing

Memory: every layout builds the model as `vitscale train` does (`Trainer._build_models`: DDP is
the plain model in each process wrapped in DistributedDataParallel; a sharded layout is built on
the meta device, `parallelize`d and `materialize`d from rank 0's CPU model), takes ONE real
training step (random images, batch 2 per data-parallel rank, cross-entropy, global-norm clipping
at 1.0, the optimizer's step), then counts on each rank the LOCAL bytes of the parameters and the
gradients (`DTensor.to_local()` of sharded ones) and of the optimizer state
(`vitscale.optim.state_bytes`, cross-checked against a count of `.to_local()` done here). Not
counted: DDP's gradient buckets (another parameter-sized buffer), activations, the process.
The requirement checked: FSDP N's max-over-ranks bytes within 5% of 1/N of DDP's.

Step time (informative; absolute CPU times on shared cores are noise): the FSDP 2 launch, after
its memory rows, builds the same model (default: the memory model) once as DDP and once as FSDP2
over its 2 processes and alternates their training steps, which one goes first alternating too,
so drift in machine load hits both alike; the figure is the median of the per-pair ratios
FSDP / DDP with their interquartile range.

Every launch writes its numbers as JSON to a temporary file this process reads; the markdown
tables are printed and everything is written to OUT/parallel.json. The floor on the wall time is
process start-up: 4 launches start 14 Python processes that each import torch (about 3.5 s of
CPU each), so even --quick takes about 1.5 min on 2 shared cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitscale.utils.tensors import local

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# layout name -> (processes, ParallelConfig settings)
LAYOUTS: dict[str, tuple[int, dict[str, int]]] = {
    "ddp2": (2, {}),
    "fsdp2": (2, {"dp_shard": 2}),
    "fsdp4": (4, {"dp_shard": 4}),
    "tp2": (2, {"tp": 2}),
}
LABELS = {"ddp2": "DDP 2", "fsdp2": "FSDP 2", "fsdp4": "FSDP 4", "tp2": "TP 2"}
FULL = dict(model="B/16", img_size=224, num_classes=1000)
QUICK = dict(model="Ti/16", img_size=64, num_classes=10, overrides={"heads": 4})  # TP needs even heads
TOLERANCE = 0.05  # FSDP N: max-over-ranks bytes within 5% of DDP's / N


# ---------------------------------------------------------------------------- in the workers
def _nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _own_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer state's local bytes counted here, independently of vitscale.optim."""
    total = 0

    def add(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += _nbytes([value])
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    for pstate in optimizer.state.values():
        add(pstate)
    return total


def _rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(spec: dict, layout, mesh, pcfg, rank: int):
    """(the model, the module to call for training) as Trainer._build_models builds them."""
    import torch.distributed as dist

    from vitscale.models.registry import build, model_config
    from vitscale.parallel import build_on_meta, materialize, parallelize

    cfg = model_config(spec["model"], img_size=spec["img_size"], num_classes=spec["num_classes"],
                       **spec.get("overrides", {}))
    torch.manual_seed(0)
    if not layout.sharded:
        model = build(cfg)
        parallelize(model, None, layout, pcfg)
        if dist.get_world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            return model, DistributedDataParallel(model)
        return model, model
    source = build(cfg) if rank == 0 else None
    model = build_on_meta(lambda: build(cfg))
    parallelize(model, mesh, layout, pcfg)
    materialize(model, torch.device("cpu"), source)
    del source
    gc.collect()
    return model, model


def _batch(spec: dict, dp_rank: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * dp_rank + step)
    x = torch.randn(batch, 3, spec["img_size"], spec["img_size"], generator=gen)
    y = torch.randint(0, spec["num_classes"], (batch,), generator=gen)
    return x, y


def _train_step(model, train_model, optimizer, sharded: bool, x, y) -> None:
    """One step as Trainer._train_step takes it (fp32, no accumulation, clipping at 1.0)."""
    import torch.nn.functional as F

    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(train_model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if sharded:
        from vitscale.parallel import clip_grad_norm

        clip_grad_norm(params, 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def _setup(settings: dict[str, int]):
    import torch.distributed as dist

    from vitscale.config import ParallelConfig
    from vitscale.parallel import Layout, build_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pcfg = ParallelConfig(**settings)
    layout = Layout(*pcfg.layout(world))
    mesh = build_mesh(layout, torch.device("cpu")) if layout.sharded else None
    return rank, world, pcfg, layout, mesh


def worker_memory(spec: dict, settings: dict[str, int], optimizers: list[str], out: Path,
                  timing: dict | None = None) -> None:
    import torch.distributed as dist

    from vitscale.config import OptimConfig
    from vitscale.optim import build_optimizer, state_bytes

    rank, world, pcfg, layout, mesh = _setup(settings)
    rows = []
    for name in optimizers:
        model, train_model = _build(spec, layout, mesh, pcfg, rank)
        optimizer = build_optimizer(model, OptimConfig(name=name))
        x, y = _batch(spec, layout.dp_rank(rank), 0, spec["batch"])
        start = time.perf_counter()
        _train_step(model, train_model, optimizer, layout.sharded, x, y)
        seconds = time.perf_counter() - start
        params = list(model.parameters())
        mine = dict(
            rank=rank,
            params=_nbytes(params),
            grads=_nbytes([p.grad for p in params if p.grad is not None]),
            state=state_bytes(optimizer),
            state_own_count=_own_state_bytes(optimizer),
            global_params=sum(p.numel() for p in params),
            sharded_params=sum(type(p).__name__ == "DTensor" for p in params),
            tensors=len(params),
            rss_mib=_rss_mib(),
            step_s=seconds,
        )
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        rows.append(dict(optimizer=name, ranks=gathered))
        del model, train_model, optimizer, params
        gc.collect()
        dist.barrier()
    times = step_times(rank, world, **timing) if timing else None
    if rank == 0:
        out.write_text(json.dumps(dict(layout=str(layout), world=world, rows=rows, times=times)))
    dist.destroy_process_group()


def step_times(rank: int, world: int, spec: dict, optimizer: str, warmup: int,
               repeats: int) -> dict[str, list[float]]:
    """Seconds per training step of DDP and of FSDP2 over the same processes, their steps
    alternated (after the memory rows, in the same launch: one process start fewer)."""
    import torch.distributed as dist

    from vitscale.config import OptimConfig, ParallelConfig
    from vitscale.optim import build_optimizer
    from vitscale.parallel import Layout, build_mesh

    optimizer_name = optimizer
    ddp_layout, fsdp_layout = Layout(dp_replicate=world), Layout(dp_shard=world)
    mesh = build_mesh(fsdp_layout, torch.device("cpu"))
    pcfg = ParallelConfig()
    runs = {}
    for key, layout, m in (("ddp", ddp_layout, None), ("fsdp", fsdp_layout, mesh)):
        model, train_model = _build(spec, layout, m, pcfg, rank)
        runs[key] = (model, train_model, build_optimizer(model, OptimConfig(name=optimizer_name)),
                     layout.sharded)
    times: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    for i in range(warmup + repeats):
        x, y = _batch(spec, rank, i, spec["batch"])
        for key in ("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp"):
            model, train_model, optimizer, sharded = runs[key]
            dist.barrier()
            start = time.perf_counter()
            _train_step(model, train_model, optimizer, sharded, x, y)
            dist.barrier()  # the step of the slowest rank
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    del runs
    gc.collect()
    return times


# ---------------------------------------------------------------------------- in the parent
def launch(nproc: int, args: list[str], timeout: float) -> tuple[dict | None, str, float]:
    """Run this file under torchrun; (its JSON or None, the output's tail on failure, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), str(Path(__file__).resolve()), *args, "--result", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            return None, (proc.stdout + proc.stderr)[-4000:], seconds
        return json.loads(out.read_text()), "", seconds


def summarize(memory: dict[str, dict]) -> list[dict]:
    """One row per (layout, optimizer): per-rank totals, the max, the ratio to DDP, the check."""
    base = {r["optimizer"]: r for r in memory.get("ddp2", {}).get("rows", [])}
    rows = []
    for name, result in memory.items():
        nproc, settings = LAYOUTS[name]
        for r in result["rows"]:
            ranks = r["ranks"]
            totals = [k["params"] + k["grads"] + k["state"] for k in ranks]
            worst = max(range(len(ranks)), key=lambda i: totals[i])
            row = dict(layout=name, optimizer=r["optimizer"], processes=nproc,
                       per_rank_mib=[t / MIB for t in totals], max_mib=totals[worst] / MIB,
                       params_mib=ranks[worst]["params"] / MIB, grads_mib=ranks[worst]["grads"] / MIB,
                       state_mib=ranks[worst]["state"] / MIB,
                       state_counts_agree=all(k["state"] == k["state_own_count"] for k in ranks),
                       max_rss_mib=max(k["rss_mib"] for k in ranks),
                       global_params=ranks[0]["global_params"])
            ddp = base.get(r["optimizer"])
            if ddp is not None:
                ddp_max = max(k["params"] + k["grads"] + k["state"] for k in ddp["ranks"])
                row["ratio"] = totals[worst] / ddp_max
                shards = settings.get("dp_shard", 1)
                if shards > 1:
                    row["target"] = 1 / shards
                    row["within"] = abs(row["ratio"] * shards - 1) <= TOLERANCE
            rows.append(row)
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| layout | optimizer | params MiB | grads MiB | state MiB | total MiB per rank | "
             "max MiB | / DDP | requirement | RSS MiB (max) |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.4f}" if "ratio" in r else "-"
        if "target" in r:
            verdict = (f"{'PASS' if r['within'] else 'FAIL'}: {r['ratio']:.4f} vs 1/{round(1 / r['target'])}"
                       f" = {r['target']:.4f} (x{r['ratio'] / r['target']:.3f})")
        else:
            verdict = "-"
        per_rank = " / ".join(f"{m:.1f}" for m in r["per_rank_mib"])
        lines.append(f"| {LABELS[r['layout']]} | {r['optimizer']} | {r['params_mib']:.1f} | "
                     f"{r['grads_mib']:.1f} | {r['state_mib']:.1f} | {per_rank} | {r['max_mib']:.1f} | "
                     f"{ratio} | {verdict} | {r['max_rss_mib']:.0f} |")
    return "\n".join(lines)


def timing_summary(times: dict[str, list[float]], optimizer: str) -> dict:
    ddp, fsdp = times["ddp"], times["fsdp"]
    ratios = [f / d for d, f in zip(ddp, fsdp)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return dict(ddp_median_s=statistics.median(ddp), fsdp_median_s=statistics.median(fsdp),
                ratio_median=statistics.median(ratios), ratio_iqr=[q1, q3], pairs=len(ratios),
                optimizer=optimizer, ddp_s=ddp, fsdp_s=fsdp)


def _git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    return dict(commit=git("rev-parse", "HEAD").strip(),
                modified=[line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['model']} at {QUICK['img_size']} px")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--optimizers", nargs="*", default=["adamw", "adafactor_bv", "adam_bf16"])
    parser.add_argument("--batch", type=int, default=2, help="images per data-parallel rank")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--time-model", default=None, help="default: the memory model")
    parser.add_argument("--time-img-size", type=int, default=None)
    parser.add_argument("--time-optimizer", default="adamw")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (default 8, quick 4)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    parser.add_argument("--out", default="runs/parallel")
    # in a torchrun worker (this file launches them):
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timing", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        timing = json.loads(args.timing) if args.timing else None
        worker_memory(json.loads(args.spec), json.loads(args.settings), args.optimizers,
                      Path(args.result), timing)
        return

    started, git_state = time.perf_counter(), _git_state()
    spec = dict(QUICK if args.quick else FULL, batch=args.batch)
    time_spec = dict(spec, model=args.time_model or spec["model"],
                     img_size=args.time_img_size or spec["img_size"])
    if args.time_model:
        time_spec.pop("overrides", None)
    repeats = args.repeats or (4 if args.quick else 8)
    timing_args = None if args.skip_timing else dict(
        spec=time_spec, optimizer=args.time_optimizer, warmup=args.warmup, repeats=repeats)
    print(f"ViT-{spec['model']} {spec.get('overrides', '')} at {spec['img_size']} px, "
          f"{spec['num_classes']} classes, batch {spec['batch']} per data-parallel rank; torch "
          f"{torch.__version__}, gloo, OMP_NUM_THREADS=1, {os.cpu_count()} CPU cores", flush=True)
    memory, failures, launches, times = {}, {}, {}, None
    plan = [(name, args.optimizers) for name in args.layouts]
    if timing_args and "fsdp2" not in args.layouts:
        plan.append(("fsdp2", []))  # a launch for the step times alone
    for name, optimizers in plan:
        nproc, settings = LAYOUTS[name]
        extra = ["--timing", json.dumps(timing_args)] if timing_args and name == "fsdp2" else []
        result, error, seconds = launch(nproc, ["--worker", "--spec", json.dumps(spec),
                                                "--settings", json.dumps(settings),
                                                "--optimizers", *optimizers, *extra], args.timeout)
        launches[name] = seconds
        if result is None:
            failures[name] = error
            print(f"{LABELS[name]}: FAILED after {seconds:.0f} s\n{error}", flush=True)
            continue
        print(f"{LABELS[name]} ({result['layout']}): {seconds:.0f} s", flush=True)
        times = result.pop("times") if extra else times
        if optimizers:
            memory[name] = result
    rows = summarize(memory)
    print(f"\nLocal bytes per rank after one training step (params, grads and state of the rank "
          f"with the most; every rank's total):\n\n{memory_table(rows)}")
    if any(not r["state_counts_agree"] for r in rows):
        print("\nNOTE: vitscale.optim.state_bytes disagrees with this script's .to_local() count "
              "for some rank; the table shows state_bytes")
    for r in rows:
        if "target" in r:
            print(f"{'PASS' if r['within'] else 'FAIL'} {LABELS[r['layout']]} {r['optimizer']}: "
                  f"max {r['max_mib']:.1f} MiB = {r['ratio']:.4f} of DDP's (1/{round(1 / r['target'])}"
                  f" = {r['target']:.4f}, measured / target = {r['ratio'] / r['target']:.4f}, "
                  f"allowed {1 - TOLERANCE:.2f}-{1 + TOLERANCE:.2f})")
    for name in failures:
        print(f"{LABELS[name]}: no row (the launch failed; its last lines are above)")

    timing = None
    if times:
        timing = timing_summary(times, args.time_optimizer)
        print(f"\nStep time, 2 processes, ViT-{time_spec['model']} {time_spec.get('overrides', '')} "
              f"at {time_spec['img_size']} px, batch {spec['batch']} per rank, {args.time_optimizer}, "
              f"{args.warmup} warm-up + {timing['pairs']} alternated pairs:\n")
        print("| layout | median step s | FSDP / DDP (median of pairs) | ratio IQR |")
        print("|---|---:|---:|---|")
        print(f"| DDP 2 | {timing['ddp_median_s']:.3f} | - | - |")
        print(f"| FSDP 2 | {timing['fsdp_median_s']:.3f} | {timing['ratio_median']:.3f} | "
              f"{timing['ratio_iqr'][0]:.3f}-{timing['ratio_iqr'][1]:.3f} |")
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s (launches: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in launches.items()) + ")")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(spec=spec, time_spec=time_spec, torch=torch.__version__, cpu_cores=os.cpu_count(),
               git=git_state, memory_rows=rows, memory_raw=memory, timing=timing,
               failures=failures, launch_seconds=launches, wall_seconds=wall)
    (out / "parallel.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'parallel.json'}")
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
