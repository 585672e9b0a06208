"""Optimizers (AdamW, Adam with bf16 momentum, big_vision Adafactor, SGD), param groups with
decoupled head / body weight decay, and big_vision learning-rate schedules."""

from __future__ import annotations

import typing
from typing import Any

import torch
import torch.nn as nn

from vitscale.config import OptimConfig
from vitscale.errors import ConfigError
from vitscale.optim.groups import factor_views, param_groups
from vitscale.optim.optimizers import AdafactorBV, AdamBF16, factor_view, factored_dims, state_bytes
from vitscale.optim.schedules import apply_lr, schedule_value

# The names optim.name accepts: declared once, on the config field.
OPTIMIZERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(OptimConfig)["name"])


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer cfg.name names, over `param_groups(model, cfg)` (then `extra`'s, an
    objective's own parameters named objective.*, in groups of their own after the model's).

    adamw: torch.optim.AdamW(betas, eps). adam_bf16: `AdamBF16`, the same with a bf16 first
    moment. adafactor_bv: `AdafactorBV` with momentum=cfg.momentum and beta2_cap=cfg.betas[1]
    (0.9 and 0.999 by default, big_vision's values), its eps stays 1e-30 (cfg.eps is Adam's),
    and the attention kernels factored in big_vision's per-head layout (`factor_views`).
    sgd: torch.optim.SGD with momentum=cfg.momentum, no Nesterov.

    Weight decay: adamw and adam_bf16 decay theta by lr * wd with the group's lr (lr_mult
    included, torch AdamW); adafactor_bv by scheduled_lr * wd, the lr before lr_mult
    (big_vision); sgd adds torch's L2 term wd * theta to the gradient (not decoupled).
    """
    cls, groups, settings = optimizer_spec(model, cfg, extra)
    return cls(groups, **settings)


def optimizer_spec(model: nn.Module, cfg: OptimConfig,
                   extra: nn.Module | None = None) -> tuple[type, list[dict[str, Any]], dict]:
    """(optimizer class, param groups, constructor settings) that `build_optimizer` builds:
    for reading the groups without constructing a torch optimizer (vitscale.plan)."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r} is not an optimizer; choose one of "
                          f"{', '.join(OPTIMIZERS)}")
    groups = param_groups(model, cfg)
    if not groups:
        raise ConfigError("the model has no trainable parameters to optimize")
    if extra is not None:
        for group in param_groups(nn.ModuleDict({"objective": extra}), cfg):
            group["name"] = f"objective/{group['name']}"
            groups.append(group)
    if cfg.name == "adamw":
        return torch.optim.AdamW, groups, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam_bf16":
        return AdamBF16, groups, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor_bv":
        views = factor_views(model)
        for group in groups:
            group["factor_views"] = [views.get(name) for name in group["param_names"]]
        return AdafactorBV, groups, dict(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         momentum=cfg.momentum, beta2_cap=cfg.betas[1])
    return torch.optim.SGD, groups, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=False,
                                         weight_decay=cfg.weight_decay)


__all__ = [
    "OPTIMIZERS",
    "AdafactorBV",
    "AdamBF16",
    "apply_lr",
    "build_optimizer",
    "factor_view",
    "factor_views",
    "factored_dims",
    "param_groups",
    "schedule_value",
    "optimizer_spec",
    "state_bytes",
]
