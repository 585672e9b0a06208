"""Training checkpoints: written atomically, resumed exactly.

Layout inside a run directory:

    checkpoints/step-000000120/model.safetensors      weights (and EMA weights as ema.*)
    checkpoints/step-000000120/optimizer.safetensors  optimizer state tensors
    checkpoints/step-000000120/state.json             step, epoch, RNG states, optimizer
                                                      hyper-parameters, metrics so far
    checkpoints/latest                                name of the newest complete checkpoint

A checkpoint folder is assembled under a temporary name, every file fsynced, then renamed into
place; `latest` is replaced atomically afterwards. A crash at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete folder. Loading never unpickles.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitscale.errors import CheckpointError
from vitscale.utils.io import _fsync_dir, atomic_write_text

LATEST = "latest"


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
    return all(torch.isfinite(p).all() for p in module.parameters())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ema: torch.nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`."""
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
    if ema is not None:
        weights.update({f"ema.{k}": v.detach().contiguous().cpu()
                        for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    doc = {"step": step, "rng": rng_state(), "optimizer": opt_meta, **state}
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(doc), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # an older attempt at the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST, name + "\n")
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text(encoding="utf-8").strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; remove "
                              f"{pointer} to start over or point it at a complete step folder")
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model / optimizer / EMA / RNG from a step folder; returns its state.json."""
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc})") from None
    own = {k: v for k, v in weights.items() if not k.startswith("ema.")}
    try:
        model.load_state_dict(own)
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("ema.")})
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({first}); was the "
                              "config changed since the run started?") from None
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(_join_optimizer_state(tensors, doc["optimizer"]))
    if restore_rng:
        set_rng_state(doc["rng"])
    return doc
