"""What autograd really keeps: the reference the activation model is checked against."""

from __future__ import annotations

import contextlib

import torch


def saved_by_block(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False,
                   kernel: str | None = None) -> tuple[int, list[int]]:
    """(bytes of the distinct storages autograd saves for backward in a forward of model(x),
    the part first saved inside each transformer block), by
    `torch.autograd.graph.saved_tensors_hooks`, the parameters' own storages excepted (a plan
    counts them as parameters). bf16: under autocast; kernel: "math" or "flash" attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitscale.parallel.blocks import transformer_blocks

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    blocks = transformer_blocks(model)
    per_block = [0] * len(blocks)
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = storage.nbytes()
            if current[0] is not None:
                per_block[current[0]] += storage.nbytes()
        return t

    def enter(i: int):
        return lambda module, args: current.__setitem__(0, i)

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: current.__setitem__(0, None)) for b in blocks]
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    attention = sdpa_kernel([backends[kernel]]) if kernel else contextlib.nullcontext()
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 \
        else contextlib.nullcontext()
    try:
        with attention, autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values()), per_block


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False,
                kernel: str | None = None) -> int:
    """The total of `saved_by_block`."""
    return saved_by_block(model, x, bf16, kernel)[0]


_MEASURED: dict[tuple, tuple] = {}


def measured_activations(cfg, batch: int, precision: str = "fp32", kernel: str = "flash",
                         every: int = 0):
    """Activations of a model without a closed form here (As-ViT, the hybrid ResNet stem),
    measured: a CPU forward of one and of two images (fp32 weights, so nothing large is
    allocated beyond the model), extended linearly to `batch` (every saved tensor is per
    image). With checkpointing, the recomputed block is the largest one measured without it.
    CPU kernels: a GPU's may save slightly differently (see plan/activations.py)."""
    from vitscale.models.config import pair
    from vitscale.models.registry import build
    from vitscale.parallel.blocks import transformer_blocks
    from vitscale.parallel.checkpointing import apply_activation_checkpointing
    from vitscale.plan.activations import Activations

    key = (repr(cfg), precision, kernel, every)
    if key not in _MEASURED:
        torch.manual_seed(0)
        model = build(cfg).train()
        h, w = pair(cfg.img_size)

        def forward(n: int) -> tuple[int, list[int]]:
            x = torch.zeros(n, cfg.in_chans, h, w)
            return saved_by_block(model, x, precision == "bf16", kernel)

        plain = [forward(1), forward(2)]
        largest = [max(p[1], default=0) for p in plain]
        if every:
            apply_activation_checkpointing(transformer_blocks(model), every)
            saved = [forward(1)[0], forward(2)[0]]
        else:
            saved = [p[0] for p in plain]
        # (constant, per image) of the saved bytes and of the recomputed block
        _MEASURED[key] = (2 * saved[0] - saved[1], saved[1] - saved[0],
                          (2 * largest[0] - largest[1], largest[1] - largest[0]) if every
                          else (0, 0))
    base, per_image, (rebase, reper) = _MEASURED[key]
    return Activations(saved=base + per_image * batch, recompute=rebase + reper * batch)
