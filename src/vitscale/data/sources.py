"""Dataset sources: (PIL RGB image, int label) items, class names, a train and an optional test split.

`DataConfig.source` picks one:

    digits                    scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
                              download; pixel values 0..16 scaled to 0..255, grey copied to RGB).
                              FIXED split, the same everywhere: stratified 80/20 train/test with
                              random_state=0, i.e. 1,437 train and 360 test images, so "digits test
                              accuracy" always means accuracy on the same 360 images.
                              The arrays are cached after the first load (utils.cache).
    imagefolder:PATH          PATH/<class>/<image> (searched recursively). When PATH/train exists it
                              is the train split and PATH/test, else PATH/val or PATH/validation, is
                              the test split; otherwise PATH is the train split and there is no test
                              split. Files without an image extension (.jpg .jpeg .png .bmp .gif
                              .webp .tif .tiff .ppm .pgm) are ignored; hidden folders too.
                              A flat folder (images, no class folders) is unlabelled: no classes,
                              every label UNLABELLED; only objective=mpp / mae train on it.
    webdataset:TRAIN[;TEST]   tar shards in WebDataset layout: members KEY.jpg|jpeg|png (or
                              .webp/.bmp) and KEY.cls (the label as decimal text), where KEY is the
                              member path up to the first dot of its file name. Brace patterns
                              (shard-{000..009}.tar, {a,b}) and glob characters expand to shards.
                              Training reads uncompressed shards by random access through an index
                              of member offsets (`WebDatasetIndex`), which is what makes the batch
                              stream addressable by step. Class names are "0".."K-1" with K =
                              largest label + 1.
    hf:NAME_OR_PATH[?OPTS]    a Hugging Face `datasets` dataset (optional dependency): a folder
                              written by save_to_disk is read with load_from_disk, anything else goes
                              to load_dataset. OPTS (URL query style, all optional): image=COLUMN,
                              label=COLUMN (default: the first Image / ClassLabel feature, else
                              common names such as image/img and label/labels/fine_label),
                              config=NAME, train=SPLIT (default train), test=SPLIT (default test,
                              else validation). Class names come from the ClassLabel feature.
    torchvision:NAME          torchvision.datasets.NAME (CIFAR10, CIFAR100, MNIST, FashionMNIST,
                              SVHN, ...) stored under DataConfig.root, downloaded when absent (needs
                              a network once).

minival: `split_minival` holds out DataConfig.minival_fraction of the train split for model
selection, as the papers do. The slice depends only on the data (random_state=0, stratified when the
labels are known and every class has two or more images), not on the run seed, so minival numbers
of different seeds compare.

Bad data (imagefolder, webdataset, hf): every image goes through `decode_image`, which decodes fully
(truncated files are an error, not padded) and converts to RGB as `to_rgb` documents (transparency is
composited on WHITE). A file that cannot be decoded raises `UnreadableImage`; the batch streams in
`vitscale.data.loader` catch it, count the file (`Data.skipped`) and keep batches whole. Layout errors
(missing path, a class folder without images, nothing usable) raise a one-line `DataError`.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import io
import os
import re
import tarfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitscale.errors import DataError
from vitscale.utils.cache import cached_arrays, sklearn_version

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
DIGITS_TEST_FRACTION = 0.2
SPLIT_RANDOM_STATE = 0  # fixed: splits are a property of the data, not of the run seed


class UnreadableImage(Exception):
    """An image that cannot be decoded; the loader skips it and counts it."""


# ---------------------------------------------------------------------------------- decoding
def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    - P (palette): through RGBA when the palette has a transparent entry, else straight to RGB.
    - LA, RGBA, PA, La, RGBa: alpha-composited on a WHITE background (scans, icons and product photos
      are drawn on white; plain convert("RGB") would expose whatever colour the transparent pixels
      happen to store, often black).
    - I;16* and I (16-bit PNG / TIFF greyscale): the 0..65535 range scaled to 0..255 (/257). Plain
      convert("L") would clip everything above 255 to white. "I" is read as 16-bit data too, since
      that is what PNG and TIFF decode to in that mode.
    - CMYK, YCbCr, L, 1, F, ...: PIL's own conversion to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode encoded bytes or a file path to an RGB image, or raise UnreadableImage."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not later in a worker
            return to_rgb(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's format plugins report corrupt data as OSError,
        # SyntaxError, ValueError, EOFError, struct.error, IndexError, ...: none may end a long run.
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------- sources
class Source(Dataset):
    """A map-style split: `src[i] -> (PIL RGB image, label)`, raising UnreadableImage for bad data.

    `key(i)` names item i (a path, or shard:key) for skip reports; `labels` is the list of labels
    when it is known without decoding (used for stratified minival), else None.
    """

    classes: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"#{i}"


class ArraySource(Source):
    """In-memory uint8 images (N, H, W) or (N, H, W, 3) with integer labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: list[str], name: str):
        self.images = images
        self.labels = [int(v) for v in labels]
        self.classes = classes
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_rgb(Image.fromarray(self.images[i])), self.labels[i]

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"


class FileSource(Source):
    """Image files on disk with their labels; `labels=None` (and no classes): unlabelled images,
    each item's label UNLABELLED."""

    def __init__(self, files: list[str], labels: list[int] | None, classes: list[str]):
        self.files = files
        self.labels = labels
        self.classes = classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return decode_image(self.files[i]), self.labels[i] if self.labels is not None else UNLABELLED

    def key(self, i: int) -> str:
        return self.files[i]


class View(Source):
    """Items `indices` of another source (train / minival slices)."""

    def __init__(self, base: Source, indices: Sequence[int]):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.classes = base.classes
        self.labels = [base.labels[i] for i in self.indices] if base.labels is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.base[self.indices[i]]

    def key(self, i: int) -> str:
        return self.base.key(self.indices[i])


@dataclass
class Splits:
    train: Source
    test: Source | None
    classes: list[str]
    bad: list[str]  # items dropped while indexing (e.g. a webdataset sample without .cls)
    # False for glyphs (digits, MNIST, SVHN), where a mirror image is another class or none:
    # the default of DataConfig.flip (None) then trains without horizontal flips.
    mirror_safe: bool = True


def load_source(source: str, root: str = "data") -> Splits:
    """The train and test splits named by a `DataConfig.source` string."""
    kind, sep, arg = source.partition(":")
    if kind == "digits" and not arg:
        return digits_source()
    loaders = {"imagefolder": imagefolder_source, "webdataset": webdataset_source,
               "hf": hf_source, "torchvision": lambda a: torchvision_source(a, root)}
    if kind not in loaders or not sep or not arg:
        raise DataError(f"data.source={source!r} is not a known source; use digits, imagefolder:PATH, "
                        "webdataset:PATTERN, hf:NAME or torchvision:NAME")
    return loaders[kind](arg)


def digits_source() -> Splits:
    arrays = cached_arrays("digits", f"digits {sklearn_version()} {DIGITS_TEST_FRACTION} "
                           f"{SPLIT_RANDOM_STATE}", _digits_arrays)
    images, labels = arrays["images"], arrays["labels"]
    train_idx, test_idx = arrays["train"], arrays["test"]
    classes = [str(c) for c in range(10)]
    return Splits(ArraySource(images[train_idx], labels[train_idx], classes, "digits/train"),
                  ArraySource(images[test_idx], labels[test_idx], classes, "digits/test"), classes, [],
                  mirror_safe=False)


def _digits_arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train, test = _stratified_split(labels, DIGITS_TEST_FRACTION)
    return {"images": images, "labels": labels, "train": train, "test": test}


def _stratified_split(labels: np.ndarray, test_size: float | int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) sorted indices: scikit-learn's stratified split at the fixed random state."""
    from sklearn.model_selection import train_test_split

    rest, held = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels,
                                  random_state=SPLIT_RANDOM_STATE)
    return np.sort(rest), np.sort(held)


# ---------------------------------------------------------------------------------- imagefolder
def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _loose_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(IMAGE_EXTENSIONS))


def _folder_split(folder: Path, classes: list[str] | None) -> FileSource:
    dirs = _class_dirs(folder)
    if classes == []:  # the train split was a flat folder: so is this one
        if dirs or not _loose_images(folder):
            raise DataError(f"{folder} must be a flat folder of images like the train split (no "
                            "class folders); use the same layout in every split")
        return FileSource(_loose_images(folder), None, [])
    if not dirs:
        loose = _loose_images(folder)
        if loose and classes is None:  # a flat folder: unlabelled images (mpp / mae pre-training)
            return FileSource(loose, None, [])
        raise DataError(f"no class folders in {folder}; expected {folder}/<class name>/<image files>"
                        " (or a flat folder of images, for objective=mpp / mae)")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(f"{folder} has class folders missing from the train split: {extra[:5]}; "
                            "use the same class folders in every split")
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for d in dirs:
        found = _images_under(d)
        if not found:
            raise DataError(f"class folder {d} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                            "add images or remove the folder")
        files += found
        labels += [index[d.name]] * len(found)
    return FileSource(files, labels, classes)


# The label of an image from an unlabelled source (a flat imagefolder): never a class index.
UNLABELLED = -1


def imagefolder_source(path: str) -> Splits:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder path {root} does not exist or is not a folder; "
                        "set data.source=imagefolder:PATH to a folder of class sub-folders")
    test_dir = None
    train_dir = root
    if (root / "train").is_dir():
        train_dir = root / "train"
        test_dir = next((root / n for n in ("test", "val", "validation") if (root / n).is_dir()), None)
    train = _folder_split(train_dir, None)
    test = _folder_split(test_dir, train.classes) if test_dir is not None else None
    return Splits(train, test, train.classes, [])


# ---------------------------------------------------------------------------------- webdataset
def expand_braces(pattern: str) -> list[str]:
    """Expand {000..009} numeric ranges (zero padding kept) and {a,b} alternatives, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def resolve_shards(pattern: str) -> list[str]:
    shards: list[str] = []
    for item in expand_braces(pattern.strip()):
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(os.path.expanduser(item)))
            if not hits:
                raise DataError(f"webdataset pattern {item!r} matches no files; check data.source")
            shards += hits
        else:
            path = os.path.expanduser(item)
            if not os.path.isfile(path):
                raise DataError(f"webdataset shard {path} does not exist; check data.source")
            shards.append(path)
    if not shards:
        raise DataError(f"webdataset pattern {pattern!r} names no shards; check data.source")
    return shards


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: 'dir/abc.seg.png' -> ('dir/abc', 'seg.png')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _parse_cls(raw: bytes) -> int | None:
    try:
        value = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if value >= 0 else None


@dataclass
class _Entry:
    shard: int
    offset: int
    size: int
    label: int
    key: str


class WebDatasetIndex(Source):
    """Random access into uncompressed WebDataset shards via the members' byte offsets.

    Indexing reads every tar header and the small .cls members once; images are read on demand
    with one seek. Samples without an image or a valid .cls are left out and reported in `bad`.
    """

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.entries: list[_Entry] = []
        self.bad: list[str] = []
        for s, shard in enumerate(shards):
            self._index(s, shard)
        self.labels = [e.label for e in self.entries]
        self.classes: list[str] = []  # set by webdataset_source once every split is indexed

    def _index(self, s: int, shard: str) -> None:
        try:
            tar = tarfile.open(shard, "r:")
        except tarfile.ReadError:
            raise DataError(f"webdataset shard {shard} is not an uncompressed tar; training reads "
                            "shards by random access, so decompress it (e.g. gunzip)") from None
        samples: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        with tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_key(member.name)
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    if ext == "cls":
                        fh = tar.extractfile(member)
                        samples[key]["cls"] = _parse_cls(fh.read() if fh else b"")
                    elif ext in WDS_IMAGE_EXTENSIONS and "image" not in samples[key]:
                        samples[key]["image"] = (member.offset_data, member.size)
            except (tarfile.TarError, OSError):  # a truncated shard: keep what was readable
                self.bad.append(f"{shard} (unreadable after {len(order)} samples)")
        for key in order:
            sample = samples[key]
            if "image" not in sample or sample.get("cls") is None:
                self.bad.append(f"{shard}:{key} (no image or no valid .cls)")
                continue
            offset, size = sample["image"]
            self.entries.append(_Entry(s, offset, size, sample["cls"], key))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        e = self.entries[i]
        with open(self.shards[e.shard], "rb") as fh:
            fh.seek(e.offset)
            data = fh.read(e.size)
        if len(data) != e.size:
            raise UnreadableImage("shard ends inside the image")
        return decode_image(data), e.label

    def key(self, i: int) -> str:
        e = self.entries[i]
        return f"{self.shards[e.shard]}:{e.key}"


def webdataset_source(arg: str) -> Splits:
    train_pattern, _, test_pattern = arg.partition(";")
    train = WebDatasetIndex(resolve_shards(train_pattern))
    test = WebDatasetIndex(resolve_shards(test_pattern)) if test_pattern.strip() else None
    bad = train.bad + (test.bad if test is not None else [])
    if not len(train):
        raise DataError(f"no usable samples in webdataset shards {train_pattern!r} (need KEY.jpg/png "
                        "and KEY.cls members in each sample)")
    num_classes = max(train.labels + (test.labels if test is not None else [])) + 1
    classes = [str(c) for c in range(num_classes)]
    train.classes = classes
    if test is not None:
        test.classes = classes
    return Splits(train, test, classes, bad)


# ---------------------------------------------------------------------------------- hf
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "cls")


class HFSource(Source):
    """A `datasets.Dataset` with an image column (decoded here, so bad bytes are skipped, not fatal)."""

    def __init__(self, ds: Any, image_col: str, label_col: str, classes: list[str], name: str):
        import datasets

        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        self.ds = ds
        self.image_col = image_col
        self.label_col = label_col
        self.labels = [int(v) for v in ds[label_col]]
        self.classes = classes
        self.name = name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        row = self.ds[i]
        value = row[self.image_col]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, Image.Image):
            try:
                value.load()
                return to_rgb(value), self.labels[i]
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - as in decode_image
                raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
        if not value:
            raise UnreadableImage("empty image field")
        return decode_image(value), self.labels[i]

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"


def _pick_column(ds: Any, wanted: str | None, feature_type: Any, names: tuple[str, ...],
                 what: str, source: str) -> str:
    columns = list(ds.features)
    if wanted:
        if wanted not in columns:
            raise DataError(f"hf dataset {source!r} has no column {wanted!r}; columns: {columns}")
        return wanted
    for col, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return col
    for col in names:
        if col in columns:
            return col
    option = "image" if what == "image" else "label"
    raise DataError(f"cannot tell the {what} column of hf dataset {source!r} (columns: {columns}); "
                    f"name it with hf:{source}?{option}=COLUMN")


def hf_source(arg: str) -> Splits:
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf:... needs the optional 'datasets' package; "
                        "pip install datasets") from None
    name, _, query = arg.partition("?")
    opts = dict(urllib.parse.parse_qsl(query))
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            obj = datasets.load_from_disk(str(path))
        else:
            obj = datasets.load_dataset(name, opts.get("config"))
    except Exception as exc:  # noqa: BLE001 - datasets fails in many ways (network, format, name)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"could not load hf dataset {name!r} ({type(exc).__name__}: {first}); check the "
                        "name, or save it with save_to_disk and pass that folder") from None
    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj)
        train_name = opts.get("train", "train")
        if train_name not in obj:
            raise DataError(f"hf dataset {name!r} has no split {train_name!r} (splits: {splits}); "
                            f"name the train split with hf:{name}?train=SPLIT")
        test_name = opts.get("test") or next((s for s in ("test", "validation", "val", "valid")
                                              if s in obj), None)
        if test_name is not None and test_name not in obj:
            raise DataError(f"hf dataset {name!r} has no split {test_name!r} (splits: {splits})")
        train_ds, test_ds = obj[train_name], (obj[test_name] if test_name else None)
    else:
        train_name, test_name, train_ds, test_ds = "train", None, obj, None
    image_col = _pick_column(train_ds, opts.get("image"), datasets.Image, _IMAGE_COLUMNS, "image", name)
    label_col = _pick_column(train_ds, opts.get("label"), datasets.ClassLabel, _LABEL_COLUMNS,
                             "label", name)
    feature = train_ds.features[label_col]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
    train = HFSource(train_ds, image_col, label_col, classes, f"{name}/{train_name}")
    test = (HFSource(test_ds, image_col, label_col, classes, f"{name}/{test_name}")
            if test_ds is not None else None)
    if not classes:
        top = max(train.labels + (test.labels if test is not None else []), default=-1)
        classes = [str(c) for c in range(top + 1)]
        train.classes = classes
        if test is not None:
            test.classes = classes
    if not len(train):
        raise DataError(f"hf dataset {name!r}: the train split is empty")
    return Splits(train, test, classes, [])


# ---------------------------------------------------------------------------------- torchvision
class TorchvisionSource(Source):
    def __init__(self, ds: Any, classes: list[str], labels: list[int] | None, name: str):
        self.ds = ds
        self.classes = classes
        self.labels = labels
        self.name = name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            image, label = self.ds[i]  # file-backed datasets (Flowers102, ...) decode here
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in decode_image
            raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return to_rgb(image), int(label)

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"


GLYPH_DATASETS = {"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "Omniglot", "USPS", "SEMEION"}


def torchvision_source(name: str, root: str) -> Splits:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        raise DataError(f"torchvision.datasets has no dataset {name!r}; use e.g. torchvision:CIFAR10, "
                        "CIFAR100, MNIST or FashionMNIST")
    params = inspect.signature(cls).parameters

    def make(train: bool) -> Any:
        kwargs: dict[str, Any] = {}
        if "train" in params:
            kwargs["train"] = train
        elif "split" in params:
            kwargs["split"] = "train" if train else "test"
        elif not train:
            return None  # no notion of splits: train only
        if "download" in params:
            kwargs["download"] = True
        try:
            return cls(root=root, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed download surfaces as many exception types
            raise DataError(f"torchvision dataset {name} is not under data.root={root} and could not be "
                            f"downloaded ({type(exc).__name__}); connect to the internet once or copy "
                            f"its files into {root}") from None

    splits = []
    for train in (True, False):
        ds = make(train)
        if ds is None:
            splits.append(None)
            continue
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = getattr(ds, "labels", None)
        labels = [int(v) for v in labels] if labels is not None else None
        splits.append((ds, labels))
    (train_ds, train_labels), test = splits[0], splits[1]
    classes = [str(c) for c in getattr(train_ds, "classes", [])]
    if not classes:
        top = max(train_labels) if train_labels else None
        if top is None:
            raise DataError(f"torchvision dataset {name} exposes neither classes nor targets; "
                            "use an imagefolder or hf source for it")
        classes = [str(c) for c in range(top + 1)]
    train = TorchvisionSource(train_ds, classes, train_labels, f"{name}/train")
    test_src = TorchvisionSource(test[0], classes, test[1], f"{name}/test") if test else None
    return Splits(train, test_src, classes, [], mirror_safe=name not in GLYPH_DATASETS)


# ---------------------------------------------------------------------------------- minival
def split_minival(n: int, fraction: float, labels: list[int] | None) -> tuple[list[int], list[int]]:
    """(train indices, minival indices): a fixed `fraction` of 0..n-1 held out, stratified when possible.

    Deterministic (random_state=0) and independent of the run seed. Stratified by `labels` when they
    are known, every class has at least two items and both parts can hold one item per class;
    otherwise a fixed random subset.
    """
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    size = min(max(int(round(n * fraction)), 1), n - 1)
    if labels is not None:
        counts = np.bincount(np.asarray(labels))
        present = int((counts > 0).sum())
        if counts[counts > 0].min() >= 2 and present <= size <= n - present:
            labels = np.asarray(labels, dtype=np.int64)
            digest = hashlib.sha1(labels.tobytes()).hexdigest()
            key = f"{sklearn_version()} {size} {SPLIT_RANDOM_STATE} {digest}"
            split = cached_arrays("stratified", key, lambda: dict(zip(
                ("rest", "held"), _stratified_split(labels, size))))
            return split["rest"].tolist(), split["held"].tolist()
    perm = np.random.default_rng(SPLIT_RANDOM_STATE).permutation(n)
    return sorted(perm[size:].tolist()), sorted(perm[:size].tolist())


__all__ = [
    "IMAGE_EXTENSIONS", "UNLABELLED", "ArraySource", "FileSource", "HFSource", "Source", "Splits",
    "TorchvisionSource",
    "UnreadableImage", "View", "WebDatasetIndex", "decode_image", "digits_source",
    "expand_braces", "hf_source", "imagefolder_source", "load_source",
    "resolve_shards", "split_minival", "split_key", "to_rgb", "torchvision_source", "webdataset_source",
]
