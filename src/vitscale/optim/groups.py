"""Parameter groups: decoupled head / body weight decay, no decay off the kernels, lr multipliers,
and big_vision's layout of the attention kernels for Adafactor's factoring."""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from vitscale.config import OptimConfig
from vitscale.errors import ConfigError
from vitscale.models.asvit import WindowAttention
from vitscale.models.layers import Attention, MAPHead
from vitscale.optim.optimizers import factor_view


def is_head_kernel(name: str) -> bool:
    """The classifier weight `head.weight` (also under a `module.` / `_orig_mod.` wrapper)."""
    return name == "head.weight" or name.endswith(".head.weight")


def is_kernel(name: str, ndim: int) -> bool:
    """big_vision decays only `*/kernel`: dense and conv weights. Everything else (LayerNorm /
    GroupNorm scales, biases, pos_embed, cls_token, the MAP probe attn_pool.latent) is left alone."""
    return name.rsplit(".", 1)[-1] == "weight" and ndim >= 2


def _compile_lr_mults(lr_mults: dict[str, float]) -> list[tuple[re.Pattern[str], float]]:
    compiled = []
    for pattern, mult in lr_mults.items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"optim.lr_mults: {pattern!r} is not a valid regex ({exc})") from None
        if not mult >= 0:
            raise ConfigError(f"optim.lr_mults.{pattern}={mult!r} must be >= 0")
        compiled.append((regex, float(mult)))
    return compiled


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, number of layers) for layer-wise lr decay.

    Ids count from the input: 0 for a ViT's patch embedding, class / distillation tokens and
    position embedding (an As-ViT's tokenizer), i + 1 for block i (As-ViT's blocks numbered across
    its stages, a re-embedding with the first block of the stage it feeds), and depth + 1 for
    everything else of the model (final norm, pooling, head). Parameters outside every ViT in
    `model` (a detector's pyramid and heads) get no id: they train at the full lr. A one-line
    ConfigError when `model` holds no ViT or As-ViT.
    """
    from vitscale.models.asvit import AsViT
    from vitscale.models.vit import VisionTransformer

    ids: dict[str, int] = {}
    layers = None
    for prefix, module in model.named_modules():
        if not isinstance(module, (VisionTransformer, AsViT)):
            continue
        pre = f"{prefix}." if prefix else ""
        if isinstance(module, VisionTransformer):
            top = len(module.blocks) + 1
            firsts = {"patch_embed": 0, "cls_token": 0, "dist_token": 0, "pos_embed": 0}
            for name, _ in module.named_parameters():
                head, _, rest = name.partition(".")
                if head == "blocks":
                    ids[pre + name] = int(rest.split(".", 1)[0]) + 1
                else:
                    ids[pre + name] = firsts.get(head, top)
        else:
            starts = [0]
            for stage in module.stages:
                starts.append(starts[-1] + len(stage))
            top = starts[-1] + 1
            for name, _ in module.named_parameters():
                parts = name.split(".")
                if parts[0] == "tokenizer":
                    ids[pre + name] = 0
                elif parts[0] == "stages":
                    ids[pre + name] = starts[int(parts[1])] + int(parts[2]) + 1
                elif parts[0] == "reembeds":  # reembeds[i] feeds stages[i + 1]
                    ids[pre + name] = starts[int(parts[1]) + 1] + 1
                else:
                    ids[pre + name] = top
        layers = top if layers is None else max(layers, top)
    if layers is None:
        raise ConfigError("optim.layer_decay needs a ViT or As-ViT in the model (it scales the lr "
                          "by block); remove optim.layer_decay for this model")
    return ids, layers


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Optimizer param groups for `model`, one per (decay kind, lr multiplier).

    Weight decay: cfg.weight_decay on kernels, cfg.head_weight_decay (None: the body value) on
    `head.weight`, 0 elsewhere unless cfg.decay_norms_and_biases (then the body value, and the
    head value still on the head kernel). lr multipliers: the first regex of cfg.lr_mults that
    `re.search`es the parameter name wins, else 1. Each group carries `name`, `weight_decay`,
    `lr_mult`, `lr = cfg.lr * lr_mult` and `scheduled_lr = cfg.lr` (the lr before lr_mult, which
    adafactor_bv multiplies its decay by); `apply_lr` rewrites both every step. Frozen parameters
    are left out. With cfg.layer_decay, each parameter's multiplier is also multiplied by
    layer_decay ** (layers - layer id) (`layer_ids`), one group per (kind, multiplier).
    """
    mults = _compile_lr_mults(cfg.lr_mults)
    decay = cfg.layer_decay
    ids, layers = layer_ids(model) if decay is not None and decay != 1.0 else ({}, 0)
    head_wd = cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay
    groups: dict[tuple[str, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_head_kernel(name) and p.ndim >= 2:
            kind, wd = "head", head_wd
        elif cfg.decay_norms_and_biases or is_kernel(name, p.ndim):
            kind, wd = "decay", cfg.weight_decay
        else:
            kind, wd = "no_decay", 0.0
        mult = next((m for regex, m in mults if regex.search(name)), 1.0)
        layer = ids.get(name, layers)
        if layer < layers:
            mult *= decay ** (layers - layer)
        key = (kind, mult)
        if key not in groups:
            label = kind if mult == 1.0 else f"{kind}/lr_mult={mult:g}"
            groups[key] = {"name": label, "params": [], "param_names": [], "weight_decay": wd,
                           "lr_mult": mult, "lr": cfg.lr * mult, "scheduled_lr": cfg.lr}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def factor_views(model: nn.Module) -> dict[str, dict]:
    """big_vision's layout of each attention tensor of `model` (parameter name -> `factor_view`),
    so that `AdafactorBV` factors them as big_vision's Adafactor factors its ViT.

    vitscale fuses q, k, v into one Linear `qkv` (3 * heads * head_dim, D); big_vision keeps
    separate query / key / value kernels (D, heads, head_dim) with (heads, head_dim) biases, and an
    out kernel (heads, head_dim, D) where vitscale has `proj` (D, D). Optax factors each kernel
    over its two largest axes, so its row and column statistics are per head (and per q / k / v).
    The MAP head's q, kv and proj map the same way. As-ViT's window attention has no big_vision
    counterpart, but it is the same multi-head layout, so it gets the same per-head kernels.
    """
    views: dict[str, dict] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (Attention, WindowAttention)):
            fused = {"qkv": 3}
        elif isinstance(module, MAPHead):
            fused = {"q": 1, "kv": 2}
        else:
            continue
        pre, heads = f"{prefix}." if prefix else "", module.heads
        for child, n in fused.items():
            linear = getattr(module, child)
            head_dim = linear.out_features // (n * heads)
            # (n * H * hd, D) -> (n, H, hd, D) -> n kernels (D, H, hd).
            views[f"{pre}{child}.weight"] = factor_view((n, heads, head_dim, linear.in_features),
                                                        (0, 3, 1, 2), stacked=1)
            if linear.bias is not None:
                views[f"{pre}{child}.bias"] = factor_view((n, heads, head_dim), (0, 1, 2), stacked=1)
        proj = module.proj
        # (D, H * hd) -> (D, H, hd) -> the out kernel (H, hd, D); its bias (D,) is as it is.
        views[f"{pre}proj.weight"] = factor_view((proj.out_features, heads, proj.in_features // heads),
                                                 (1, 2, 0))
    return views
