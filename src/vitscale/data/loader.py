"""`build_data(cfg, seed) -> Data`: splits, a deterministic resumable training stream, eval loaders.

API (what `vitscale.train.loop` calls):

    data = build_data(cfg.data, seed)
    for step, epoch, x, y in data.train_batches(start_step=k, batch_size=B):   # endless: break
        ...          # x float32 (B, 3, S, S) in [-1, 1], y int64 (B,); the first step yielded is k
    loader = data.eval_loader("minival" | "test" | "train", batch_size)   # None: no such split
    for x, y in loader: ...                                               # in order, no shuffling
    data.num_classes, data.class_names
    data.skipped                     # int: distinct unreadable images met so far (all splits)
    data.train, data.minival, data.test    # map-style (PIL RGB image, label); minival/test may be None
    data.mixup_alpha, data.cutmix_alpha    # resolved from the AugReg preset and overrides
    data.augment                           # AugmentSettings (RandAugment layers / magnitude too)
    data.steps_per_epoch(B)                # len(train) // B (drop_last)

Determinism and resumption. The batch at global step s is a pure function of (seed, s, B, data):
epoch e = s // steps_per_epoch, the epoch's order is torch.randperm(len(train)) under a generator
seeded from (seed, e), step s takes positions (s mod steps_per_epoch) * B ... + B of it (drop_last),
and each sample's augmentation runs under the global torch RNG forked and seeded from
(seed, e, sample index). So `train_batches(start_step=k)` starts at batch k directly (no replay of
earlier batches), returns bitwise the same batches as an uninterrupted stream, whatever num_workers
is (DataLoader keeps batch order; worker RNG state plays no part).

Bad images. An unreadable image never shortens a training batch: the item is replaced by the next
readable one in the split (index i+1, i+2, ... up to 16 tries, deterministic), keeping its own
augmentation seed. Eval loaders drop unreadable items from their batch. Either way the file is
recorded in the main process (the collate function carries the names back from the workers), and
`data.skipped` counts distinct files. When a split's distinct unreadable files exceed
cfg.max_skip_fraction of the split, or no readable image is left, a one-line DataError stops the
run naming the first such file. Samples dropped while indexing (webdataset members without an image
or a label) count the same way, checked when the data is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vitscale.config import DataConfig
from vitscale.data.sources import Source, Splits, UnreadableImage, View, load_source, split_minival
from vitscale.data.transforms import AugmentSettings, resolve_augment, transforms_for
from vitscale.errors import DataError

MAX_SUBSTITUTE_TRIES = 16
_PEEK_LIMIT = 64
_MASK64 = (1 << 64) - 1
_PERM_TAG, _AUG_TAG = 0x5045524D, 0x41554746  # separate the two seed streams


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (order matters); the same on every platform."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 1


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, _PERM_TAG, epoch))
    return torch.randperm(n, generator=gen)


# ---------------------------------------------------------------------------------- items
def describe(source: Source, i: int, exc: Exception) -> str:
    """'name (reason)' for an unreadable item; the same file always gives the same string."""
    return f"{source.key(i)} ({str(exc)[:80]})"


class TrainItems(Dataset):
    """`items[(epoch, i)] -> (augmented tensor, label, unreadable keys)`; see the module docstring.
    With `clean_transform` the tensor is (2, C, H, W): the augmented view and the un-augmented one."""

    def __init__(self, source: Source, transform: Any, seed: int, clean_transform: Any = None):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.clean_transform = clean_transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor | None, int, tuple[str, ...]]:
        epoch, i = item
        n = len(self.source)
        bad: list[str] = []
        for t in range(min(MAX_SUBSTITUTE_TRIES, n)):
            j = (i + t) % n
            try:
                image, label = self.source[j]
            except UnreadableImage as exc:
                bad.append(describe(self.source, j, exc))
                continue
            # Seeded per (seed, epoch, index): independent of worker, order and what ran before.
            with torch.random.fork_rng(devices=[]):
                # The CPU generator alone (the transforms draw from it): torch.manual_seed would
                # also queue a lazy CUDA seeding with a stack trace, ~1.6 ms per image.
                torch.default_generator.manual_seed(derive_seed(self.seed, _AUG_TAG, epoch, i))
                x = self.transform(image)
            if self.clean_transform is not None:
                x = torch.stack([x, self.clean_transform(image)])
            return x, label, tuple(bad)
        return None, -1, tuple(bad)


class EvalItems(Dataset):
    """`items[i] -> (eval tensor, label, unreadable keys)`; an unreadable item has tensor None."""

    def __init__(self, source: Source, transform: Any):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[str, ...]]:
        try:
            image, label = self.source[i]
        except UnreadableImage as exc:
            return None, -1, (describe(self.source, i, exc),)
        return self.transform(image), label, ()


def collate(samples: list[tuple[torch.Tensor | None, int, tuple[str, ...]]]):
    """(images, labels, unreadable keys): unreadable items are dropped from the batch."""
    kept = [s for s in samples if s[0] is not None]
    bad = [key for s in samples for key in s[2]]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    return (torch.stack([s[0] for s in kept]), torch.tensor([s[1] for s in kept], dtype=torch.long),
            bad)


class BatchStream:
    """Index batches [(epoch, i), ...] from global step `start_step` on, endlessly (a batch_sampler)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0,
                 shard: slice = slice(None)):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.shard = shard  # the part of every global batch this process loads (data parallel)
        self.steps_per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, pos = divmod(self.start_step, self.steps_per_epoch)
        b = self.batch_size
        while True:
            order = epoch_permutation(self.seed, epoch, self.n).tolist()
            for p in range(pos, self.steps_per_epoch):
                yield [(epoch, i) for i in order[p * b:(p + 1) * b][self.shard]]
            epoch, pos = epoch + 1, 0


class EvalLoader:
    """Iterates (images, labels) over a split in order; records unreadable items in `Data`."""

    def __init__(self, data: Data, split: str, source: Source, batch_size: int):
        self.data, self.split, self.dataset, self.batch_size = data, split, source, batch_size
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:  # one DataLoader per EvalLoader: its workers (if any) persist
            kwargs = self.data._loader_kwargs()
            self._loader = DataLoader(EvalItems(self.dataset, self.data.eval_transform),
                                      batch_size=self.batch_size, shuffle=False, drop_last=False,
                                      collate_fn=collate, persistent_workers=kwargs["num_workers"] > 0,
                                      **kwargs)
        for x, y, bad in self._loader:
            self.data._note_unreadable(self.split, bad)
            if y.numel():
                yield x, y


# ---------------------------------------------------------------------------------- Data
class Data:
    """The datasets of one run and the streams over them; build it with `build_data`."""

    def __init__(self, cfg: DataConfig, seed: int, splits: Splits, train: Source,
                 minival: Source | None, resize_only: bool):
        self.cfg = cfg
        self.seed = seed
        self.train = train
        self.minival = minival
        self.test = splits.test
        self.class_names = list(splits.classes)
        self.num_classes = len(self.class_names)
        self.labelled = self.num_classes > 0  # False: a flat image folder (label-free objectives)
        self.augment: AugmentSettings = resolve_augment(cfg)
        self.mixup_alpha = self.augment.mixup_alpha
        self.cutmix_alpha = self.augment.cutmix_alpha
        self.resize_only = resize_only
        self.train_transform, self.eval_transform = transforms_for(cfg, resize_only, splits.mirror_safe)
        self._unreadable: dict[str, set[str]] = {}
        self._sizes = {"train": len(train), "minival": len(minival) if minival is not None else 0,
                       "test": len(self.test) if self.test is not None else 0}
        if splits.bad:  # dropped while indexing: judged against everything that was indexed
            self._sizes["index"] = len(train) + self._sizes["minival"] + self._sizes["test"] + len(splits.bad)
            self._note_unreadable("index", splits.bad)

    @property
    def skipped(self) -> int:
        """Distinct unreadable images (or unusable samples) met so far, over all splits."""
        return len(set().union(*self._unreadable.values())) if self._unreadable else 0

    def unreadable(self) -> list[str]:
        """The names of the unreadable items met so far, sorted."""
        return sorted(set().union(*self._unreadable.values())) if self._unreadable else []

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        return len(self.train) // (batch_size or self.cfg.batch_size)

    def _loader_kwargs(self) -> dict[str, Any]:
        # A DataLoader draws its workers' base seed when an iterator starts; from its own
        # generator, not the global RNG, so that starting a stream (on resume, or an eval pass)
        # leaves the dropout / drop-path RNG of the training step untouched.
        return dict(num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                    generator=torch.Generator().manual_seed(self.seed))

    def _note_unreadable(self, split: str, keys: list[str]) -> None:
        if not keys:
            return
        seen = self._unreadable.setdefault(split, set())
        seen.update(keys)
        size = self._sizes.get(split, 0)
        first = min(seen)
        if len(seen) >= size:
            raise DataError(f"no readable images left in the {split} split ({len(seen)} unreadable, "
                            f"e.g. {first}); check the files of data.source={self.cfg.source}")
        limit = self.cfg.max_skip_fraction
        if len(seen) > limit * size:
            raise DataError(f"{len(seen)} of {size} images in the {split} split are unreadable, more "
                            f"than data.max_skip_fraction={limit} (e.g. {first}); fix or remove them, "
                            "or raise data.max_skip_fraction")

    def train_batches(self, start_step: int = 0, batch_size: int | None = None,
                      shard: slice = slice(None), clean_view: bool = False) -> Iterator[tuple]:
        """Endless (step, epoch, images, labels) from global step `start_step` on; see module doc.
        `shard`: the slice of each global batch of `batch_size` to load (one data-parallel rank's).
        `clean_view`: (step, epoch, images, labels, the same examples un-augmented), the eval
        transform's centre crops (a fixed teacher's view); the augmented images are unchanged."""
        b = batch_size or self.cfg.batch_size
        spe = self.steps_per_epoch(b)
        if spe < 1:
            raise DataError(f"the train split has {len(self.train)} images, fewer than one batch of "
                            f"{b}; lower data.batch_size")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        clean = self.eval_transform if clean_view else None
        loader = DataLoader(TrainItems(self.train, self.train_transform, self.seed, clean),
                            batch_sampler=BatchStream(len(self.train), b, self.seed, start_step, shard),
                            collate_fn=collate, **self._loader_kwargs())
        step = start_step
        for x, y, bad in loader:
            self._note_unreadable("train", bad)
            if not y.numel():
                raise DataError(f"no readable image found for step {step} after {len(bad)} tries "
                                f"(e.g. {min(bad)}); check the files of data.source={self.cfg.source}")
            if clean_view:
                yield step, step // spe, x[:, 0], y, x[:, 1]
            else:
                yield step, step // spe, x, y
            step += 1

    def eval_loader(self, split: str, batch_size: int | None = None,
                    shard: tuple[int, int] = (0, 1)) -> EvalLoader | None:
        """(images, labels) batches of `split` ("minival", "test" or "train", without augmentation),
        in order, last batch partial; None when the split does not exist. `shard=(rank, size)`:
        only the items rank, rank + size, ... (data-parallel evaluation; sum the counts)."""
        sources = {"train": self.train, "minival": self.minival, "test": self.test}
        if split not in sources:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(sources)}")
        source = sources[split]
        if source is None or not len(source):
            return None
        rank, size = shard
        if size > 1:
            source = View(source, range(rank, len(source), size))
        return EvalLoader(self, split, source, batch_size or self.cfg.eval_batch_size)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in (("train", self.train), ("minival", self.minival),
                                                       ("test", self.test)) if v is not None)
        return f"Data({self.cfg.source!r}, {sizes}, classes={self.num_classes})"


def _first_image_side(source: Source) -> int | None:
    """The longer side of the first readable image among the first few (None if none decodes)."""
    for i in range(min(len(source), _PEEK_LIMIT)):
        try:
            image, _ = source[i]
        except UnreadableImage:
            continue
        return max(image.size)
    return None


def build_data(cfg: DataConfig, seed: int = 0) -> Data:
    """Load `cfg.source`, hold out minival, and set up the transforms (see the module docstring)."""
    resolve_augment(cfg)  # a bad preset fails before any data is read
    if not 0 <= cfg.minival_fraction < 1:
        raise DataError(f"data.minival_fraction={cfg.minival_fraction} must be in [0, 1)")
    splits = load_source(cfg.source, cfg.root)
    base = splits.train
    if not len(base):
        raise DataError(f"the train split of data.source={cfg.source} is empty")
    for name, split in (("train", base), ("test", splits.test)):
        labels = split.labels if split is not None else None
        if labels and not 0 <= min(labels) <= max(labels) < len(splits.classes):
            raise DataError(f"the {name} split of data.source={cfg.source} has labels outside "
                            f"0..{len(splits.classes) - 1} (min {min(labels)}, max {max(labels)}); "
                            "fix the labels or use a labelled split (hf: ?test=SPLIT)")
    rest, held = split_minival(len(base), cfg.minival_fraction, base.labels)
    train = View(base, rest) if held else base
    if cfg.train_fraction < 1:  # a fixed stratified subset, e.g. 10% of the labels
        labels = train.labels
        _, subset = split_minival(len(train), cfg.train_fraction, labels)
        train = View(train, subset)
    minival = View(base, held) if held else None
    side = _first_image_side(base)
    if side is None and len(base) <= _PEEK_LIMIT:
        raise DataError(f"none of the {len(base)} train images of data.source={cfg.source} can be "
                        f"decoded (e.g. {base.key(0)}); check the files")
    return Data(cfg, seed, splits, train, minival, resize_only=side is not None and side <= cfg.img_size)
