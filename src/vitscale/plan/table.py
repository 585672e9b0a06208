"""Scaling ViT's question as a table: for each named size and device count, the smallest
layout whose every device fits (`vitscale plan --table`)."""

from __future__ import annotations

from vitscale.errors import UserError
from vitscale.plan.planner import plan

DEVICE_COUNTS = tuple(2**i for i in range(11))  # 1 .. 1024


def _layouts(n: int):
    """(label, plan keywords) for n devices, least machinery first: DDP, then FSDP / HSDP with
    the smallest shard group, then activation checkpointing, then tensor parallelism."""
    for tp in (1, 2, 4, 8):
        for act in ("none", "full"):
            if tp > n:
                continue
            shard = 1
            while shard * tp <= n:
                replicate = n // (shard * tp)
                sharded = shard > 1 or tp > 1
                parts = []
                if shard > 1:
                    parts.append(f"fsdp{shard}" if replicate == 1 else f"hsdp{replicate}x{shard}")
                elif replicate > 1 and not sharded:
                    parts.append("ddp")
                if tp > 1:
                    parts.append(f"tp{tp}")
                label = "x".join(parts) or "1"
                if act == "full":
                    label += "+ac"
                yield label, dict(dp_shard=shard, tp=tp, dp_replicate=replicate, act_ckpt=act,
                                  param_dtype="bfloat16" if sharded else "float32")
                shard *= 2


def smallest_layout(model: str, devices: int, **kwargs) -> str | None:
    """The label of the first layout of `_layouts(devices)` that fits, or None."""
    for label, layout in _layouts(devices):
        try:
            if plan(model, **layout, **kwargs).fits:
                return label
        except UserError:  # e.g. heads not divisible by this tp
            continue
    return None


def plan_table(sizes: list[str] | None = None, devices: tuple[int, ...] = DEVICE_COUNTS,
               **kwargs) -> dict[str, dict[int, str | None]]:
    """{model: {device count: smallest layout or None}}; kwargs as `plan` takes them (batch
    per device, optimizer, device memory, precision, image size)."""
    from vitscale.models.registry import DEFAULT_PATCH, SIZES

    sizes = sizes or [f"{s}/{DEFAULT_PATCH[s]}" for s in SIZES]
    return {m: {n: smallest_layout(m, n, **kwargs) for n in devices} for m in sizes}


def render_table(table: dict[str, dict[int, str | None]]) -> str:
    counts = list(next(iter(table.values())))
    cells = [[m] + [table[m][n] or "-" for n in counts] for m in table]
    head = ["model"] + [str(n) for n in counts]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), *map(line, cells)])
