"""What autograd really keeps: the reference the activation model is checked against."""

from __future__ import annotations

import contextlib

import torch


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False,
                kernel: str | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward in a forward of model(x)
    (`torch.autograd.graph.saved_tensors_hooks`), the parameters' own excepted (a plan counts
    them as parameters). bf16: under CPU autocast; kernel: "math" or "flash" attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    attention = sdpa_kernel([backends[kernel]]) if kernel else contextlib.nullcontext()
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 \
        else contextlib.nullcontext()
    with attention, autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())
