"""State of a sharded run: the model (and EMA) weights and the optimizer state as DTensor shards
for torch.distributed.checkpoint (DCP), and the consolidated full weights for `model/`.

Only tensors go through DCP (each process writes its shards; DCP can load them into another
mesh, or into one process). The optimizer's non-tensor state (param groups, step counters kept
as Python ints) is the same in every process and goes to the checkpoint's state.json, so
nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

MODEL, EMA, OPTIM = "model", "ema", "optim"


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def split_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                ema: nn.Module | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({flat key: the live tensor or DTensor}, the optimizer's JSON part): the model's, the
    EMA's and the optimizer's tensors under `model.`, `ema.` and `optim.` keys."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors = {f"{MODEL}.{k}": v for k, v in get_model_state_dict(model).items()}
    if ema is not None:
        tensors.update({f"{EMA}.{k}": v for k, v in get_model_state_dict(ema).items()})
    if optimizer is None:
        return tensors, {}
    opt = _optim_state(model, optimizer)
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, pstate in opt["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM}.{fqn}.{name}"] = value
            else:
                scalars.setdefault(fqn, {})[name] = value
    return tensors, {"param_groups": opt["param_groups"], "scalars": scalars}


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: nn.Module | None) -> dict[str, Any]:
    """Every process writes its shards into the folder `path` (collective); returns the
    optimizer's JSON part. Tensor-parallel fused weights are stored in a contiguous layout
    (tp.dcp_layout: the same values)."""
    import torch.distributed.checkpoint as dcp

    from vitscale.parallel.tp import dcp_layout

    tensors, meta = split_state(model, optimizer, ema)
    dcp.save({k: dcp_layout(v) for k, v in tensors.items()}, checkpoint_id=str(path))
    return meta


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 ema: nn.Module | None, optimizer_meta: dict[str, Any] | None) -> None:
    """Load a DCP folder written at any mesh (or by one process) into this process's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from vitscale.parallel.tp import dcp_layout, restore_layout

    # A fresh optimizer's state is created by get_optimizer_state_dict (a step with zero
    # gradients at lr 0; adafactor_bv then skips its decay too), then overwritten by the load.
    live, _ = split_state(model, optimizer, ema)
    stored = {k: dcp_layout(v) for k, v in live.items()}
    dcp.load(stored, checkpoint_id=str(path))  # in place
    for key, tensor in live.items():
        restore_layout(tensor, stored[key])
    options = StateDictOptions(strict=True)
    set_model_state_dict(model, _under(live, MODEL), options=options)
    if ema is not None:
        set_model_state_dict(ema, _under(live, EMA), options=options)
    if optimizer is None or optimizer_meta is None:
        return
    state: dict[str, dict[str, Any]] = {}
    for key, value in _under(live, OPTIM).items():
        fqn, name = key.rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, values in optimizer_meta["scalars"].items():
        state.setdefault(fqn, {}).update(values)
    set_optimizer_state_dict(model, optimizer, {"state": state,
                                                "param_groups": optimizer_meta["param_groups"]})


def _under(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 (an empty dict elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
