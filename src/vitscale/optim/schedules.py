"""Learning-rate schedules as big_vision's `create_learning_rate_schedule` (base 1), stateless so
that resuming at any step gives the same lr."""

from __future__ import annotations

import math
import typing

from torch.optim import Optimizer

from vitscale.config import ScheduleConfig
from vitscale.errors import ConfigError

# The names schedule.decay accepts: declared once, on the config field.
DECAYS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ScheduleConfig)["decay"])


def warmup_steps(total_steps: int, cfg: ScheduleConfig) -> int:
    """cfg.warmup_steps when set, else round(cfg.warmup_fraction * total_steps)."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(round(cfg.warmup_fraction * total_steps))


def schedule_value(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The lr multiplier in [0, 1] for the update made at 0-based `step` of `total_steps`.

    With w warmup and c cooldown steps, T = total_steps and p = clip((step - w) / (T - w), 0, 1):
      cosine    e + (1 - e) * (1 + cos(pi p)) / 2         e = cfg.end_lr_fraction
      linear    e + (1 - e) * (1 - p)
      rsqrt     1 / sqrt(1 + max(step - w, 0) / timescale) (1 at the end of warmup)
      constant  1
    times min(1, step / w) (linear warmup, 0 at step 0 as big_vision) and
    min(1, (T - step) / c) (linear cooldown: 1/c at the last update, 0 at step T).
    """
    if cfg.decay not in DECAYS:
        raise ConfigError(f"schedule.decay={cfg.decay!r} must be one of {', '.join(DECAYS)}")
    if not 0.0 <= cfg.end_lr_fraction <= 1.0:
        raise ConfigError(f"schedule.end_lr_fraction={cfg.end_lr_fraction!r} must be in [0, 1]")
    if cfg.decay == "rsqrt" and cfg.timescale <= 0:
        raise ConfigError(f"schedule.timescale={cfg.timescale!r} must be positive")
    if cfg.warmup_steps < 0 or cfg.cooldown_steps < 0 or not 0.0 <= cfg.warmup_fraction <= 1.0:
        raise ConfigError("schedule.warmup_steps and cooldown_steps must be >= 0 and "
                          "schedule.warmup_fraction in [0, 1]")
    total = max(int(total_steps), 1)
    step = min(max(int(step), 0), total)
    w = warmup_steps(total, cfg)
    progress = min(max((step - w) / max(total - w, 1), 0.0), 1.0)
    end = cfg.end_lr_fraction
    if cfg.decay == "cosine":
        value = end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay == "linear":
        value = end + (1.0 - end) * (1.0 - progress)
    elif cfg.decay == "rsqrt":
        value = 1.0 / math.sqrt(1.0 + max(step - w, 0) / cfg.timescale)
    else:
        value = 1.0
    if w > 0:
        value *= min(1.0, step / w)
    if cfg.cooldown_steps > 0:
        value *= min(1.0, (total - step) / cfg.cooldown_steps)
    return value


def apply_lr(optimizer: Optimizer, step: int, total_steps: int, base_lr: float,
             cfg: ScheduleConfig) -> float:
    """Set every group's lr to base_lr * schedule_value * group['lr_mult'] (1 when absent) and its
    `scheduled_lr` to the same without lr_mult (adafactor_bv's weight decay, as big_vision's, is
    not multiplied by lr_mult); returns the lr of a group with lr_mult 1."""
    lr = base_lr * schedule_value(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["scheduled_lr"] = lr
    return lr
