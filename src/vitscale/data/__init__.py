"""Data: sources, AugReg transforms, Mixup/CutMix and the deterministic, resumable batch stream.

    from vitscale.data import build_data
    data = build_data(cfg.data, seed)
    for step, epoch, x, y in data.train_batches(start_step=k, batch_size=B): ...
    data.eval_loader("minival" | "test", batch_size), data.num_classes, data.skipped

See `vitscale.data.loader` for the API and its guarantees, `sources` for the dataset sources and
bad-data handling, `transforms` for the presets and RandAugment, `mixing` for Mixup / CutMix.
"""

from vitscale.data.loader import Data, build_data, derive_seed, epoch_permutation
from vitscale.data.mixing import cutmix, mix_batch, mixup
from vitscale.data.sources import (
    Source,
    UnreadableImage,
    WebDatasetIndex,
    decode_image,
    expand_braces,
    load_source,
    split_minival,
    to_rgb,
)
from vitscale.data.transforms import (
    AUGREG_PRESETS,
    AugmentSettings,
    RandAugment,
    eval_transform,
    resolve_augment,
    train_transform,
)

__all__ = [
    "AUGREG_PRESETS", "AugmentSettings", "Data", "RandAugment", "Source", "UnreadableImage",
    "WebDatasetIndex", "build_data", "cutmix", "decode_image", "derive_seed",
    "epoch_permutation", "eval_transform", "expand_braces", "load_source", "mix_batch", "mixup",
    "resolve_augment", "split_minival", "to_rgb", "train_transform",
]
