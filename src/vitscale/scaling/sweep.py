"""`vitscale sweep`: one ordinary training run per point of a grid (or of a SoViT star), resumable.

    points = sweep_points(grid=["model.name=[Ti/4,S/4]", "epochs=[5,10]"])
    run_sweep("configs/demo.yaml", points, "runs/sweep", jobs=2)

- A grid point is a set of `key=value` overrides of the base config; its run directory is
  DIR/<key=value,...> and holds a normal `vitscale train` run.
- Star (SoViT's star sweep): `star={"width": 64, "depth": 4, "mlp_dim": 128}` is the centre; the
  grid axes over `model.overrides.width|depth|mlp_dim` are varied one at a time with the other
  dimensions at the centre, crossed with every other axis (e.g. budgets).
- Resumable: a finished run (its final `model/` written) is skipped, an unfinished one resumes
  from its latest checkpoint (the trainer does that), so re-running the command finishes the
  sweep. Every point's config is checked before anything runs.
- `DIR/sweep.jsonl`, the index: one line per point (its overrides, star dimension, run
  directory, status, final metrics), rewritten atomically from the run directories after every
  run, so it lists each point once whoever writes it.
- Several at once: `jobs > 1` runs points as `vitscale train` subprocesses; under torchrun each
  process takes every world-size-th point and runs it as a one-process run of its own.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vitscale.config import load_config, parse_override
from vitscale.scaling.errors import ScalingError
from vitscale.utils.io import atomic_write_text

SHAPE_KEYS = {"width": "model.overrides.width", "depth": "model.overrides.depth",
              "mlp_dim": "model.overrides.mlp_dim"}
INDEX = "sweep.jsonl"
# torchrun's variables: a sweep's runs are one-process runs of their own.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def parse_axis(item: str) -> tuple[str, list[Any]]:
    """'model.name=[Ti/4,S/4]' -> ('model.name', ['Ti/4', 'S/4'])."""
    key, values = parse_override(item, example="epochs=[5,10,20]")
    if not isinstance(values, list) or not values:
        raise ScalingError(f"--grid {item!r}: give a list of values, e.g. {key}=[5,10,20]")
    return key, values


def parse_center(text: str) -> dict[str, Any]:
    """'width=64,depth=4,mlp_dim=128' -> {'width': 64, ...} (the star's centre)."""
    center = {}
    for part in text.split(","):
        key, value = parse_override(part.strip(), example="width=64")
        if key not in SHAPE_KEYS:
            raise ScalingError(f"--star {text!r}: {key!r} is not a shape dimension; give "
                               "width=W,depth=D,mlp_dim=M")
        center[key] = value
    if set(center) != set(SHAPE_KEYS):
        raise ScalingError(f"--star {text!r} must give all of width, depth and mlp_dim")
    return center


def sweep_points(grid: list[str], star: str | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """[{"overrides": {key: value}, "star": dim or None}] for a grid or a star sweep."""
    axes = [parse_axis(item) for item in grid]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ScalingError(f"--grid names a key twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    if star is None:
        if not axes:
            raise ScalingError("a sweep needs at least one --grid KEY=[v1,v2,...]")
        return [{"overrides": dict(zip(keys, combo)), "star": None}
                for combo in itertools.product(*(v for _, v in axes))]
    center = parse_center(star) if isinstance(star, str) else dict(star)
    shape = {k: v for k, v in axes if k in SHAPE_KEYS.values()}
    others = [(k, v) for k, v in axes if k not in SHAPE_KEYS.values()]
    if not shape:
        raise ScalingError("a star sweep varies model.overrides.width / depth / mlp_dim; give "
                           "them as --grid axes, e.g. --grid 'model.overrides.width=[32,64,128]'")
    dims = {v: k for k, v in SHAPE_KEYS.items()}
    points, seen = [], set()
    for key, values in shape.items():
        for value in values:
            shape_values = {SHAPE_KEYS[d]: center[d] for d in SHAPE_KEYS}
            shape_values[key] = value
            for combo in itertools.product(*(v for _, v in others)):
                overrides = {**shape_values, **dict(zip([k for k, _ in others], combo))}
                ident = json.dumps(overrides, sort_keys=True)
                at_center = value == center[dims[key]]
                if ident in seen:  # the centre: one run serves every dimension
                    continue
                seen.add(ident)
                points.append({"overrides": overrides, "star": "center" if at_center else dims[key]})
    return points


def point_name(overrides: dict[str, Any]) -> str:
    """The run directory's name: `key=value,...` ('/' in values written as '-')."""
    return ",".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}".replace("/", "-")
                    for k, v in overrides.items())


def override_list(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"
            for k, v in overrides.items()]


def _status(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """('done' | 'partial' | 'pending', the final test record when done)."""
    if (run_dir / "model" / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        if rows and rows[-1].get("split") == "test":
            return "done", rows[-1]
    if (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file():
        return "partial", {}
    return "pending", {}


def write_index(out: Path, points: list[dict[str, Any]], base: str | None,
                center: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for point in points:
        run_dir = out / point_name(point["overrides"])
        status, final = _status(run_dir)
        row = {"name": run_dir.name, "run_dir": str(run_dir), "overrides": point["overrides"],
               "star": point["star"], "status": status}
        if final:
            row["final"] = {k: v for k, v in final.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append(row)
    header = {"sweep": True, "config": base, "center": center, "points": len(points)}
    atomic_write_text(out / INDEX, "".join(json.dumps(r) + "\n" for r in [header, *rows]))
    return rows


def read_index(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = Path(out) / INDEX
    if not path.is_file():
        raise ScalingError(f"{out} is not a sweep directory (no {INDEX}); run vitscale sweep first")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]


def run_sweep(config: str | None, points: list[dict[str, Any]], out: str | Path, jobs: int = 1,
              overrides: list[str] | None = None, center: dict[str, Any] | None = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every point not finished yet; returns the index rows."""
    out = Path(out)
    settings = {}
    for point in points:  # every config checked before anything runs or is written
        name = point_name(point["overrides"])
        ov = [*(overrides or []), *override_list(point["overrides"]), f"out_dir={out / name}"]
        load_config(config, ov)
        settings[name] = ov
    out.mkdir(parents=True, exist_ok=True)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    mine = [p for i, p in enumerate(points) if i % world == rank]
    if rank == 0:
        write_index(out, points, config, center)
    todo = [p for p in mine if _status(out / point_name(p["overrides"]))[0] != "done"]
    log(f"sweep: {len(points)} points, {len(points) - len(todo) if world == 1 else '?'} done, "
        f"{len(todo)} to run here" + (f" (process {rank} of {world})" if world > 1 else ""))

    def one(point: dict[str, Any]) -> None:
        name = point_name(point["overrides"])
        if world == 1 and jobs == 1:
            from vitscale.train import run

            run(config, settings[name])
        else:
            _subprocess(config, settings[name], out / name, rank if world > 1 else None)
        write_index(out, points, config, center)
        log(f"sweep: finished {name}")

    try:
        if jobs > 1 or world > 1:
            with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
                for future in [pool.submit(one, p) for p in todo]:
                    future.result()
        else:
            for point in todo:
                one(point)
    finally:  # interrupted too: the index says what is done (after a kill, the next start does)
        rows = write_index(out, points, config, center)
    return rows


def _subprocess(config: str | None, overrides: list[str], run_dir: Path,
                local_rank: int | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    if local_rank is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", str(local_rank))
    command = [sys.executable, "-m", "vitscale.cli", "train", *(["--config", config] if config else []),
               *overrides, "progress=false"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "sweep.log", "a", encoding="utf-8") as fh:
        done = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise ScalingError(f"sweep run {run_dir.name} failed (exit {done.returncode}); see "
                           f"{run_dir / 'sweep.log'}, then run the same sweep command again to "
                           "resume")
