"""Classification metrics from logits: top-1 / top-5, per-class accuracy, expected calibration
error (ECE) over equal-width confidence bins, and a reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ECE_BINS = 15


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of (0, 1]: count, mean confidence and accuracy (bins hold (lo, hi])."""
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    conf = confidence.double()
    # A confidence c goes to bin b with edges[b] < c <= edges[b+1] (c = 0 to bin 0).
    which = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(conf[mask].mean()) if n else 0.0,
                    "accuracy": float(correct[mask].double().mean()) if n else 0.0})
    return out


def expected_calibration_error(bins: list[dict[str, float]]) -> float:
    """sum_b (n_b / N) |accuracy_b - confidence_b|."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                           bins: int = ECE_BINS, loss: str = "softmax") -> dict[str, Any]:
    """top1, top5, per-class accuracy, ECE (confidence = max softmax probability, or max sigmoid
    for `loss='sigmoid'` models) and the reliability bins."""
    logits, labels = logits.float(), labels.long()
    num_classes = num_classes or logits.shape[1]
    probs = logits.sigmoid() if loss == "sigmoid" else logits.softmax(dim=-1)
    confidence, pred = probs.max(dim=-1)
    correct = pred == labels
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        per_class[c] = float(correct[mask].double().mean()) if mask.any() else float("nan")
    reliability = calibration_bins(confidence, correct, bins)
    return {"top1": float(correct.double().mean()), "top5": float(top5.double().mean()),
            "per_class": per_class, "ece": expected_calibration_error(reliability),
            "reliability": reliability, "n": int(labels.numel())}


def reliability_diagram(reliability: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """A PNG: accuracy per confidence bin against the diagonal, with the bin counts below."""
    from vitscale.utils.plot import figure, save_png

    centers = [(b["lo"] + b["hi"]) / 2 for b in reliability]
    width = reliability[0]["hi"] - reliability[0]["lo"]
    fig = figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, [b["accuracy"] for b in reliability], width=width * 0.95, label="accuracy",
            color="tab:blue", edgecolor="black")
    top.bar(centers, [b["confidence"] - b["accuracy"] if b["count"] else 0 for b in reliability],
            bottom=[b["accuracy"] for b in reliability], width=width * 0.95, color="tab:red",
            alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(title or "reliability diagram")
    bottom.bar(centers, [b["count"] for b in reliability], width=width * 0.95, color="grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    return save_png(fig, path, dpi=100)
