"""The supervised objective: cross-entropy of the model's logits against the (mixed) labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str, smoothing: float) -> torch.Tensor:
    """Mean over the batch of softmax or sigmoid cross-entropy against soft targets (B, K)."""
    logits = logits.float()
    if smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / targets.shape[-1]
    if kind == "sigmoid":  # big_vision: sum over classes, mean over examples
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


class Objective:
    """What one training step optimises; the trainer runs it (see vitscale.objectives).

    The base class is the supervised objective. Subclasses override what differs."""

    name = "supervised"
    needs_clean_view = False  # the trainer also loads each example's un-augmented centre crop
    uses_labels = True  # False (mpp, mae): labels are never read or mixed; unlabelled data works
    uses_whole_model = True  # False: some model parameters get no gradient (DDP must know)

    def __init__(self, loss: str = "softmax", label_smoothing: float = 0.0) -> None:
        self.kind, self.smoothing = loss, label_smoothing

    def trainable(self) -> torch.nn.Module | None:
        """Parameters the objective trains beside the model (checkpointed with the run)."""
        return None

    def prepare(self, images: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor | None,
                lam: float, step: int) -> torch.Tensor | None:
        """A per-example tensor computed once on the whole (mixed) batch of training step `step`
        and then split with it into accumulation chunks, or None."""
        return None

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
             prepared: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(the loss to minimise, how many predictions were right, how many were made): the
        training accuracy is their ratio (none is logged when nothing is counted)."""
        logits = model(images)
        return self.label_loss(logits, targets), *self.hits(logits, targets)

    @staticmethod
    def hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Examples whose top logit is the dominant target class, and the examples counted."""
        return (logits.argmax(-1) == targets.argmax(-1)).sum(), targets.shape[0]

    def label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets, self.kind, self.smoothing)

    def forward_flops(self, model: torch.nn.Module, flops: float) -> float:
        """Forward FLOPs per training image, given the model's own (`flops`, models.counts): what
        the trainer's train_flops (3 x forward x images) is made of."""
        return flops

    def evaluate(self, model, loader, device, precision, world, copies) -> dict[str, float] | None:
        """The objective's own evaluation of a split ({"loss", "n", maybe "accuracy"}), or None:
        the trainer's classification evaluator."""
        return None

    def observer(self, split: str):
        """Something called on every evaluation batch as (images, student logits, labels) and
        at the end for extra metrics (`.metrics()`), or None."""
        return None
