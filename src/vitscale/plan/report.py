"""The text `vitscale plan` prints for a Plan."""

from __future__ import annotations

from vitscale.plan.planner import Plan


def human(n: float) -> str:
    """Bytes in binary units: 1.50 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def render(p: Plan) -> str:
    lay = p.layout
    layout = f"dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x tp {lay['tp']}"
    if lay["sequence_parallel"]:
        layout += " (sequence parallel)"
    rows = [
        ("parameters (fp32 master)", p.params_bytes),
        ("gradients (fp32)", p.grads_bytes),
        (f"optimizer state ({p.optimizer})", p.optimizer_bytes),
        (f"FSDP unsharded buffers ({p.param_dtype} params)", p.fsdp_buffers_bytes),
        ("DDP gradient buckets", p.comm_buffers_bytes),
        (f"activations ({p.kernel} attention, checkpointing {p.act_ckpt})", p.activations_bytes),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{p.model} at {p.img_size[0]}x{p.img_size[1]}, {p.params / 1e6:,.1f}M parameters; "
             f"{p.batch} images per device, {p.precision}; {layout}",
             "per device:"]
    lines += [f"  {name:<{width}}{human(value):>12}" for name, value in rows]
    budget = p.device_memory * (1 - p.margin)
    verdict = "fits" if p.fits else "does NOT fit"
    where = ("the start of backward: every activation held, gradients not allocated yet"
             if p.peak_at == "backward start" else "the end of backward: gradients whole")
    if p.peak_at == "backward start" and p.accum_steps > 1:
        where = "the start of backward, gradients kept from the micro-batches before"
    lines.append(f"  {'peak':<{width}}{human(p.total_bytes):>12}  at {where}")
    lines.append(f"  {verdict} in {human(p.device_memory)} less a {p.margin:.0%} margin "
                 f"({human(budget)})")
    lines.append(f"largest batch per device that fits: {p.max_batch}")
    lines.append(f"training FLOPs per step per device: {p.flops_per_step:.3e}")
    if p.step_time_s is not None:
        lines.append(f"time per step at {p.mfu:.0%} MFU of {p.peak_flops / 1e12:.0f} TFLOP/s: "
                     f"{p.step_time_s * 1e3:.1f} ms ({p.batch / p.step_time_s:,.0f} images/s "
                     "per device)")
    return "\n".join(lines)
