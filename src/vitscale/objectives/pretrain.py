"""What the label-free objectives (`mpp`, `mae`) share: pixel targets, seeded masks, evaluation.

The encoder is the model being trained: an ordinary `VisionTransformer` built without a classifier
(num_classes 0), so the run's `model/` folder is a checkpoint that `finetune`, `fewshot`,
`linear-probe` and `model.init` read. What only pre-training needs (mask embedding, prediction
head, MAE decoder) is the objective's own module, checkpointed with the run as objective.*.

Training masks are drawn on the CPU for the whole global batch from a generator seeded by (run
seed, step), and each data-parallel process takes its slice: a resumed run draws the masks the
uninterrupted one drew, and a torchrun run the masks of a one-process run, on any device.
Evaluation uses masks seeded by (run seed, process, batch index), the same at every evaluation, so
minival losses compare.
"""

from __future__ import annotations

from typing import Any

import torch

from vitscale.errors import ConfigError
from vitscale.objectives.supervised import Objective

TRAIN_STREAM, EVAL_STREAM = 0x6D707031, 0x6D707032  # keep training and evaluation masks apart


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """The data pipeline's [-1, 1] values (transforms.ValueRange) back to [0, 255]."""
    return (images.float() + 1.0) * 127.5


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C), patches in the patch embedding's row-major token
    order, each patch's values ordered (row, column, channel) as MAE's patchify does."""
    b, c, h, w = images.shape
    ph, pw = patch
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def color_classes(images: torch.Tensor, patch: tuple[int, int], side: int, bits: int = 3
                  ) -> torch.Tensor:
    """Each patch downsized to side x side (area average) in `bits`-bit colour: (B, N, side^2)
    class indices in [0, 2^(bits C)), channel levels combined as r * 64 + g * 8 + b for 3 bits.
    side=1: the patch's mean colour, the ViT paper's masked-patch target."""
    pixels = to_pixels(images)
    b, c, h, w = pixels.shape
    ph, pw = patch
    cells = pixels.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    cells = torch.nn.functional.adaptive_avg_pool2d(cells.reshape(-1, c, ph, pw), side)
    levels = 2 ** bits
    level = torch.floor(cells * (levels / 256.0)).clamp_(0, levels - 1).long()  # (B*N, C, s, s)
    weights = levels ** torch.arange(c - 1, -1, -1, device=level.device)
    classes = (level * weights.view(1, c, 1, 1)).sum(1)
    return classes.reshape(b, (h // ph) * (w // pw), side * side)


def check_patch_encoder(model: torch.nn.Module, objective: str) -> None:
    """A ViT whose tokens are patches of the image, or a one-line ConfigError."""
    from vitscale.models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"objective={objective} needs a ViT with a patch embedding, not "
                          f"{type(model).__name__} (As-ViT's overlapping tokenizer has no per-patch "
                          "tokens to mask); use a ViT (model.name=S/16, Ti/4, ...)")
    if model.cfg.stem != "patch":
        raise ConfigError(f"objective={objective} needs a plain patch embedding; a hybrid "
                          f"({model.cfg.stem}) stem sees every pixel before any patch is masked; "
                          "use a ViT without a ResNet stem")


class PretrainObjective(Objective):
    """The base of the label-free objectives: no labels, no mixing, its own evaluation."""

    uses_labels = False  # the trainer neither reads nor mixes labels (a flat image folder works)
    uses_whole_model = False  # the classifier-side parameters (pooling, head) get no gradient

    def __init__(self, seed: int = 0, batch_size: int | None = None, shard: slice = slice(None),
                 rank: int = 0) -> None:
        super().__init__()
        # batch_size: the global batch the masks are drawn for; shard: this process's slice of
        # it; rank: its data-parallel rank (evaluation masks).
        self.seed, self.batch_size, self.shard, self.rank = seed, batch_size, shard, rank

    def generator(self, step: int) -> torch.Generator:
        from vitscale.data import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, TRAIN_STREAM, step))

    def prepare(self, images, targets, clean, lam, step):
        plan = self.draw(self.batch_size or images.shape[0], self.generator(step))[self.shard]
        if plan.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for a mask slice of {plan.shape[0]}")
        return plan

    def draw(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """A per-example plan of which patches are hidden / corrupted, (B, ...) long, on the CPU."""
        raise NotImplementedError

    def loss(self, model, images, targets, prepared):
        return self.batch_loss(model, images, prepared.to(images.device))

    def batch_loss(self, model, images, plan) -> tuple[torch.Tensor, Any, int]:
        """(loss, correctly predicted targets or None, how many targets were predicted)."""
        raise NotImplementedError

    def forward_flops(self, model, flops):
        """Measured with torch's FLOP counter on one image: the encoder on the tokens it sees
        plus the head or decoder (for MAE far less than the model's full-sequence count)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        cfg = model.cfg  # the trainer's own model, before any DDP wrapper
        device = next(model.parameters()).device
        x = torch.zeros(1, cfg.in_chans, *cfg.img_size, device=device)
        plan = self.draw(1, torch.Generator().manual_seed(0)).to(device)
        was_training = model.training
        model.eval()  # no dropout draws; grad mode on keeps the blocks off the fused inference op
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.batch_loss(model, x, plan)
        model.train(was_training)
        return float(counter.get_total_flops())

    @torch.no_grad()
    def evaluate(self, model, loader, device, precision, world, copies) -> dict[str, float]:
        """The objective's loss (and accuracy, where it has one) on a split's images, with the
        evaluation masks; each data-parallel process passes its shard and the sums are added."""
        from vitscale.data import derive_seed
        from vitscale.train.distributed import all_sum

        model.eval()
        extras = self.trainable()
        if extras is not None:
            extras.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        count, images_seen = 0, 0
        for i, (x, _labels) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, EVAL_STREAM, i, self.rank))
            plan = self.draw(x.shape[0], gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, hits, n = self.batch_loss(model, x, plan)
            loss_sum += loss.double() * x.shape[0]
            if hits is not None:
                correct += hits.double()
            count += n
            images_seen += x.shape[0]
        if extras is not None:
            extras.train()
        loss_sum, correct, count, images_seen = all_sum([loss_sum, correct, count, images_seen],
                                                        world, device)
        images_seen = images_seen / copies
        out = {"loss": loss_sum / copies / max(images_seen, 1), "n": int(images_seen)}
        if count:
            out["accuracy"] = correct / count
        return out
