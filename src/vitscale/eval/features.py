"""Frozen features of a model on a data split: batched, under `torch.inference_mode`, cached.

The cache key is a hash of the model's weights and config plus everything that decides the
images (source, split, image size, minival fraction), so sweeping shots, regularisation or
probe weight decay over the same (checkpoint, data) pair costs one forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vitscale.utils.io import atomic_write


@dataclass
class Features:
    pooled: torch.Tensor  # (N, D) float32: the pre-logits representation (`forward_pooled`)
    logits: torch.Tensor | None  # (N, C) float32, None for a model without a head
    labels: torch.Tensor  # (N,) int64
    seconds: float = 0.0  # forward time (0 when read from the cache)

    @property
    def images_per_s(self) -> float:
        return len(self.labels) / self.seconds if self.seconds else float("nan")


def extract(model: torch.nn.Module, loader, device: torch.device | str = "cpu",
            precision: str = "fp32") -> Features:
    """Pooled features and logits of every batch of `loader` ((images, labels) batches)."""
    device = torch.device(device)
    model.eval().to(device)
    pooled, logits, labels = [], [], []
    has_head = not isinstance(getattr(model, "head", None), torch.nn.Identity)
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                p = model.forward_pooled(x.to(device))
                out = model.forward_head(p) if has_head else None
            pooled.append(p.float().cpu())
            if out is not None:
                logits.append(out.float().cpu())
            labels.append(y.cpu())
    seconds = time.perf_counter() - start
    if not labels:
        raise ValueError("the loader yielded no batches")
    # Concatenated outside inference mode: ordinary tensors that a probe can train on.
    return Features(torch.cat(pooled).clone(), torch.cat(logits).clone() if logits else None,
                    torch.cat(labels).long(), seconds)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config and every tensor of its state dict."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITSCALE_CACHE", Path.home() / ".cache" / "vitscale")) / "features"


class FeatureCache:
    """Features on disk (safetensors) keyed by (model fingerprint, data description)."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0

    def path(self, model_key: str, data_key: dict) -> Path:
        blob = json.dumps({"model": model_key, "data": data_key}, sort_keys=True).encode()
        return self.root / f"{hashlib.sha256(blob).hexdigest()[:32]}.safetensors"

    def get(self, model: torch.nn.Module, data_key: dict, compute) -> Features:
        """Cached features for (model, data_key), or `compute()` them and store them."""
        if not self.enabled:
            return compute()
        from safetensors.torch import load_file, save_file

        path = self.path(fingerprint(model), data_key)
        if path.is_file():
            try:
                t = load_file(str(path))
                self.hits += 1
                return Features(t["pooled"], t.get("logits"), t["labels"])
            except Exception:  # a damaged cache file is recomputed, never trusted
                path.unlink(missing_ok=True)
        feats = compute()
        tensors = {"pooled": feats.pooled.contiguous(), "labels": feats.labels.contiguous()}
        if feats.logits is not None:
            tensors["logits"] = feats.logits.contiguous()
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        return feats
