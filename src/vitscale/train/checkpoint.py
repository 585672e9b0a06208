"""Training checkpoints: written atomically, resumed exactly.

Layout inside a run directory:

    checkpoints/step-000000120/model.safetensors      weights (EMA weights as ema.*, an
                                                      objective's own as objective.*)
    checkpoints/step-000000120/optimizer.safetensors  optimizer state tensors
    checkpoints/step-000000120/state.json             step, epoch, RNG states, optimizer
                                                      hyper-parameters, metrics so far
    checkpoints/latest                                name of the newest complete checkpoint

A sharded run (FSDP2 / tensor parallel) writes `step-N/dcp/` instead of the two safetensors
files: torch.distributed.checkpoint's shard files and metadata, written by every process, with
the optimizer's non-tensor state in state.json ("format": "dcp"); it can be resumed at another
mesh or in one process.

A checkpoint folder is assembled under a temporary name, every file fsynced, then renamed into
place; `latest` is replaced atomically afterwards. A crash at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete folder (a folder re-written at the same
step is first moved aside as `.old-step-N-PID`, which stays a resume candidate until the new one
is in place). state.json records the SHA-256 of both safetensors files, so a truncated or
corrupted file is recognised on resume, and resuming falls back to the newest checkpoint that
loads. Loading never unpickles.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from vitscale.errors import CheckpointError
from vitscale.models.tensorfile import state_dict_mismatch
from vitscale.train.distributed import SINGLE, World, barrier, gather_objects
from vitscale.utils.io import _fsync_dir, atomic_write_text, first_line
from vitscale.utils.tensors import local

LATEST = "latest"
SHARDED, DCP_DIR = "dcp", "dcp"  # state.json "format" of a sharded checkpoint, and its folder
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
_STEP_DIR = re.compile(r"^(?:\.old-)?step-(\d+)(?:-\d+)?$")


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    state = {"torch": _encode_rng(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_encode_rng(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode_rng(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_rng(s) for s in state["cuda"]])


def _split_optimizer_state(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors go to safetensors (keyed state.<param>.<name>); everything else to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def all_finite(module: torch.nn.Module) -> bool:
    """Whether this process's weights are finite (its own shards of a sharded model)."""
    return all(torch.isfinite(local(p)).all() for p in module.parameters())



class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read back (truncated, corrupted, missing)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ema: torch.nn.Module | None = None,
    keep: int = 2,
    extras: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. `extras`: an
    objective's own trained parameters (a distillation projection), stored as objective.*."""
    if not all_finite(model) or (ema is not None and not all_finite(ema)):
        raise CheckpointError(f"refusing to write checkpoint at step {step}: non-finite weights")
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for prefix, module in (("ema.", ema), ("objective.", extras)):
        if module is not None:
            weights.update({f"{prefix}{k}": v.detach().contiguous().cpu()
                            for k, v in module.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(weights, str(tmp / TENSOR_FILES[0]))
    save_file(opt_tensors, str(tmp / TENSOR_FILES[1]))
    sums = {}
    for f in TENSOR_FILES:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
        sums[f] = _sha256(tmp / f)
    doc = {"step": step, "rng": rng_state(), "optimizer": opt_meta, "sha256": sums, **state}
    atomic_write_text(tmp / "state.json", json.dumps(doc))
    _fsync_dir(tmp)
    return _commit(tmp, final, keep)


def _commit(tmp: Path, final: Path, keep: int) -> Path:
    """Move the complete folder `tmp` to `final`, point `latest` at it, prune old ones."""
    ckpt_root, name = final.parent, final.name
    aside = None
    if final.exists():  # an older attempt at the same step (e.g. after --resume): replace it,
        aside = ckpt_root / f".old-{name}-{os.getpid()}"  # keeping it until the new one is in
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST, name + "\n")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".tmp-*"), *ckpt_root.glob(".old-*")]:  # left by a crash
        shutil.rmtree(stale, ignore_errors=True)


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict[str, Any],
                            ema: torch.nn.Module | None, keep: int, world: World) -> Path:
    """Checkpoint `step` of a sharded model (collective: every process calls it): each process
    writes its shards with torch.distributed.checkpoint into `step-N/dcp/` (a folder every
    process can reach, e.g. a shared file system), the file sizes and SHA-256 sums are computed
    by the processes in turn, and rank 0 writes state.json and renames the folder into place as
    `save_checkpoint` does, so a torn write is never taken for the latest checkpoint."""
    from vitscale.parallel.state import save_sharded

    finite = all_finite(model) and (ema is None or all_finite(ema))
    if not all(gather_objects(finite, world)):
        raise CheckpointError(f"refusing to write checkpoint at step {step}: non-finite weights")
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step-{step:09d}"
    tmp = ckpt_root / f".tmp-{name}-sharded"
    if world.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / DCP_DIR).mkdir(parents=True)
    barrier(world)
    opt_meta = save_sharded(tmp / DCP_DIR, model, optimizer, ema)
    barrier(world)
    names = sorted(p.name for p in (tmp / DCP_DIR).iterdir())
    mine = {}
    for file in names[world.rank::world.size]:
        with open(tmp / DCP_DIR / file, "rb") as fh:
            os.fsync(fh.fileno())
        mine[file] = [(tmp / DCP_DIR / file).stat().st_size, _sha256(tmp / DCP_DIR / file)]
    sums = {k: v for part in gather_objects(mine, world) for k, v in part.items()}
    final = ckpt_root / name
    if world.is_main:
        doc = {"step": step, "rng": rng_state(), "format": SHARDED, "optimizer": opt_meta,
               "files": sums, **state}
        _fsync_dir(tmp / DCP_DIR)
        atomic_write_text(tmp / "state.json", json.dumps(doc))
        _fsync_dir(tmp)
        _commit(tmp, final, keep)
    barrier(world)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `checkpoints/latest` names (None without one); an error when it is missing."""
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text(encoding="utf-8").strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; remove "
                              f"{pointer} to start over or point it at a complete step folder")
    return path


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders to resume from, best first: the one `latest` names, then every other
    step folder (and one moved aside mid-replacement), newest step first."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), not p.name.startswith("."), p) for p in ckpt_root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    ordered = [p for *_, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        named = ckpt_root / pointer.read_text(encoding="utf-8").strip()
        ordered = [named] + [p for p in ordered if p != named]
    return ordered


@dataclass
class CheckpointFiles:
    """What a step folder holds, read and verified but not yet applied to a model."""

    path: Path
    doc: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]

    @property
    def sharded(self) -> bool:
        """Written by a sharded run: the tensors are in `dcp/`, read when applied."""
        return self.doc.get("format") == SHARDED


def read_checkpoint(path: str | Path, world: World = SINGLE) -> CheckpointFiles:
    """Read every file of a step folder, checking the recorded SHA-256 sums; a CorruptCheckpoint
    naming the first file that cannot be read back. A sharded checkpoint's files are checked by
    the processes in turn (collective) and read when applied."""
    path = Path(path)
    where = path / "state.json"
    try:
        doc = json.loads(where.read_text(encoding="utf-8"))
        step = doc["step"]
        if doc.get("format") == SHARDED:
            return _check_sharded(path, doc, world)
        tensors = []
        for name in TENSOR_FILES:
            where = path / name
            data = where.read_bytes()
            expected = doc.get("sha256", {}).get(name)  # absent in checkpoints before the sums
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise ValueError("its SHA-256 differs from the one recorded at save time")
            tensors.append(load_safetensors(data))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CorruptCheckpoint(f"{where} cannot be read ({first_line(exc)})") from None
    if not isinstance(step, int):
        raise CorruptCheckpoint(f"{path / 'state.json'} has no integer step")
    return CheckpointFiles(path, doc, *tensors)


def _check_sharded(path: Path, doc: dict[str, Any], world: World) -> CheckpointFiles:
    names = sorted(doc["files"])
    problem = None
    for name in names[world.rank::world.size]:
        size, digest = doc["files"][name]
        file = path / DCP_DIR / name
        try:
            if file.stat().st_size != size:
                problem = f"{file} cannot be read (it has {file.stat().st_size} bytes, not {size})"
            elif _sha256(file) != digest:
                problem = f"{file} cannot be read (its SHA-256 differs from the one recorded at save time)"
        except OSError as exc:
            problem = f"{file} cannot be read ({first_line(exc)})"
        if problem:
            break
    problems = [p for p in gather_objects(problem, world) if p]
    if problems:
        raise CorruptCheckpoint(problems[0])
    if not isinstance(doc["step"], int):
        raise CorruptCheckpoint(f"{path / 'state.json'} has no integer step")
    return CheckpointFiles(path, doc, {}, {})


def apply_sharded_checkpoint(files: CheckpointFiles, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None = None,
                             ema: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` / `optimizer` / `ema`, sharded at any mesh or
    whole in one process (DCP reshards); returns its state.json. RNG states are the caller's."""
    from vitscale.parallel.state import load_sharded

    try:
        load_sharded(files.path / DCP_DIR, model, optimizer, ema, files.doc["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {files.path} does not fit this model or optimizer "
                              f"({first_line(exc)}); was the config changed since the run "
                              "started?") from None
    return files.doc


def apply_checkpoint(files: CheckpointFiles, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None = None,
                     ema: torch.nn.Module | None = None, restore_rng: bool = True,
                     extras: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore model / optimizer / EMA / an objective's parameters (/ RNG) from a read
    checkpoint; returns its state.json. A checkpoint of another model is a one-line error naming
    the tensors that differ."""
    prefixes = ("ema.", "objective.")
    own = {k: v for k, v in files.weights.items() if not k.startswith(prefixes)}
    parts = [("", model, own)]
    for prefix, module in zip(prefixes, (ema, extras)):
        if module is not None:
            parts.append((prefix, module, {k[len(prefix):]: v for k, v in files.weights.items()
                                           if k.startswith(prefix)}))
    for prefix, module, weights in parts:
        problem = state_dict_mismatch(module.state_dict(), weights)
        if problem:
            raise CheckpointError(f"checkpoint {files.path} does not fit this model ({prefix}"
                                  f"{problem}); was the config changed since the run started?")
        module.load_state_dict(weights)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_join_optimizer_state(files.optimizer, files.doc["optimizer"]))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {files.path}: its optimizer state does not fit "
                                  f"this optimizer ({first_line(exc)}); was optim.name or the "
                                  "model changed since the run started?") from None
    if restore_rng:
        set_rng_state(files.doc["rng"])
    return files.doc


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model / optimizer / EMA / RNG from a step folder; returns its state.json."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, ema, restore_rng)


def read_newest_loadable(run_dir: str | Path, warn: Callable[[str], None],
                         set_aside: bool = True, world: World = SINGLE) -> CheckpointFiles | None:
    """The newest checkpoint of a run directory whose files read back whole (None when there is
    none at all). Each unreadable one is reported through `warn` in one line and, with
    `set_aside` (the process that writes the run directory), renamed to `unreadable-step-N`
    (never deleted, never pruned) with `latest` pointed at the one that loads. When none reads,
    a one-line CheckpointError."""
    ckpt_root = Path(run_dir) / "checkpoints"
    candidates = resume_candidates(run_dir)
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            files = read_checkpoint(path, world)
        except CorruptCheckpoint as exc:
            bad.append((path, str(exc)))
            continue
        for old, reason in bad:
            kept = ckpt_root / f"unreadable-{old.name.lstrip('.')}"
            if set_aside and old.is_dir():
                os.replace(old, kept)
            where = f"; it is kept as {kept}" if old.is_dir() or kept.is_dir() else ""
            warn(f"checkpoint {old.name} is unreadable: {reason}{where}; resuming from "
                 f"{path.name}")
        if bad and set_aside:
            atomic_write_text(ckpt_root / LATEST, path.name + "\n")
        return files
    if candidates:
        reasons = "; ".join(reason for _, reason in bad[:2])
        raise CheckpointError(f"no checkpoint in {ckpt_root} can be read ({reasons}); move the "
                              "folder away to start over")
    return None
