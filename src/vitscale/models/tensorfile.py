"""Read a flat name -> tensor mapping from safetensors or a (weights-only) PyTorch pickle, and
say in one line how a state dict fails to fit a model."""

from __future__ import annotations

from pathlib import Path

import torch

from vitscale.errors import CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `.pt/.pth/.bin` pickle.

    Pickles are read with `torch.load(weights_only=True)`, so no untrusted code runs. A
    checkpoint that wraps its weights (`{"state_dict": ...}` or `{"model": ...}`) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device="cpu")
        elif suffix in PICKLE_SUFFIXES:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(
                f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors, .npz, or a "
                f"PyTorch state dict ({', '.join(PICKLE_SUFFIXES)})"
            )
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt, truncated, or a pickle with non-tensor objects
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a valid checkpoint ({reason})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(tensors, dict) and isinstance(tensors.get(key), dict):
            tensors = tensors[key]
            break
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def state_dict_mismatch(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                        optional: tuple[str, ...] = ()) -> str | None:
    """None when `loaded` has exactly `own`'s keys and shapes (keys in `optional` may be
    missing); otherwise one line naming the first missing, unexpected and misshapen tensors,
    with both shapes."""
    missing = [k for k in own if k not in loaded and k not in optional]
    unexpected = [k for k in loaded if k not in own]
    shapes = [f"{k} {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in loaded and loaded[k].shape != own[k].shape]  # model order
    parts = [f"{what} {short_list(items)}" for what, items in
             (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if items]
    return "; ".join(parts) or None


def short_list(items: list[str], n: int = 4) -> str:
    """The first `n` items, comma-separated, and how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
