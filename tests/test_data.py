"""vitscale.data: sources and bad data, AugReg presets, the resumable stream, Mixup / CutMix.

Everything runs on scikit-learn's bundled digits or on files the tests write; nothing downloads.
"""

from __future__ import annotations

import io
import itertools
import re
import tarfile
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision.transforms import v2

from vitscale.config import DataConfig
from vitscale.data import (
    AUGREG_PRESETS,
    RandAugment,
    build_data,
    cutmix,
    decode_image,
    expand_braces,
    mix_batch,
    mixing,
    mixup,
    resolve_augment,
    train_transform,
    transforms,
)
from vitscale.data.loader import BatchStream
from vitscale.data.transforms import RANDAUG_OPS, apply_op
from vitscale.errors import ConfigError, DataError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(source="digits", img_size=16, minival_fraction=0.1), seed=0)


def test_digits_fixed_stratified_split(digits):
    assert (len(digits.train), len(digits.minival), len(digits.test)) == (1293, 144, 360)
    assert digits.num_classes == 10 and digits.class_names == [str(c) for c in range(10)]
    # test: 20% of each class (rounding), minival: 10% of each class of the rest
    full = Counter(digits.train.labels + digits.minival.labels + digits.test.labels)
    assert sum(full.values()) == 1797
    for part, share in ((Counter(digits.test.labels), 0.2), (Counter(digits.minival.labels), 0.08)):
        for c in range(10):
            assert abs(part[c] - share * full[c]) <= 1.5
    # the split is a property of the data, not of the run seed
    other = build_data(DataConfig(source="digits", img_size=16), seed=123)
    assert [other.test.key(i) for i in range(5)] == [digits.test.key(i) for i in range(5)]
    assert other.minival.indices == digits.minival.indices


def test_digits_cache_gives_the_computed_arrays_and_survives_a_torn_entry(tmp_path, monkeypatch):
    """The cached digits arrays and minival split equal a fresh scikit-learn computation; a torn
    cache file is recomputed (and rewritten), not read."""
    from vitscale.data import sources
    from vitscale.utils.cache import cached_arrays

    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path))
    fresh = sources._digits_arrays()
    for _ in range(2):  # the first call computes and writes, the second reads the file
        got = sources.digits_source()
        assert np.array_equal(got.train.images, fresh["images"][fresh["train"]])
        assert got.test.labels == fresh["labels"][fresh["test"]].tolist()
    labels = np.asarray(got.train.labels)
    rest, held = sources._stratified_split(labels, 144)  # round(0.1 x 1437)
    assert sources.split_minival(len(labels), 0.1, got.train.labels) == (rest.tolist(), held.tolist())
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["digits", "stratified"]
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}

    assert cached_arrays("t", "k", compute)["x"].tolist() == [0, 1, 2]
    (entry,) = tmp_path.glob("t-*.npz")
    entry.write_bytes(entry.read_bytes()[:20])  # torn
    assert cached_arrays("t", "k", compute)["x"].tolist() == [0, 1, 2] and len(calls) == 2
    assert cached_arrays("t", "k", compute)["x"].tolist() == [0, 1, 2] and len(calls) == 2
    assert cached_arrays("t", "other key", compute) and len(calls) == 3


def test_digits_value_range(digits):
    assert digits.resize_only  # 8x8 images at img_size 16: plain resize, no center crop
    x, y = next(iter(digits.eval_loader("test", 64)))
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() == -1.0 and x.max() == 1.0  # 0 -> -1 and 16 -> 255 -> +1 exactly
    image, _ = digits.test[0]
    assert image.mode == "RGB" and image.size == (8, 8)
    _, _, xt, _ = next(digits.train_batches(0, batch_size=32))
    assert xt.shape == (32, 3, 16, 16) and xt.min() >= -1.0 and xt.max() <= 1.0


# ---------------------------------------------------------------------------------- presets
# The AugReg settings (Steiner et al. 2021, arXiv:2106.10270, whose Fig. 4 the configs point to) as
# big_vision's configs/vit_i21k.py and vit_i1k.py define them (the same in both): RANDAUG_DEF
# gives the pp op, MIXUP_DEF the mixup p (the Beta concentration: vitscale's mixup_alpha).
BIG_VISION_RANDAUG_DEF = {"none": "", "light1": "randaug(2,0)", "light2": "randaug(2,10)",
                          "medium1": "randaug(2,15)", "medium2": "randaug(2,15)",
                          "strong1": "randaug(2,20)", "strong2": "randaug(2,20)"}
BIG_VISION_MIXUP_P = {"none": 0.0, "light1": 0.0, "light2": 0.2, "medium1": 0.2, "medium2": 0.5,
                      "strong1": 0.5, "strong2": 0.8}
# The project's research notes, beside the repository in the workspace; a clone alone lacks them.
RESEARCH_NOTES = Path(__file__).resolve().parents[1].parent / "shared" / "research" / "big_vision.md"


def _big_vision_preset(name: str) -> tuple[int, int, float]:
    randaug = re.fullmatch(r"randaug\((\d+),(\d+)\)", BIG_VISION_RANDAUG_DEF[name])
    layers, magnitude = (int(randaug[1]), int(randaug[2])) if randaug else (0, 0)
    return layers, magnitude, BIG_VISION_MIXUP_P[name]


@pytest.mark.parametrize("name", sorted(BIG_VISION_RANDAUG_DEF))
def test_augreg_presets(name):
    assert AUGREG_PRESETS[name] == _big_vision_preset(name)
    aug = resolve_augment(DataConfig(augment=name))
    assert (aug.randaug_layers, aug.randaug_magnitude, aug.mixup_alpha) == _big_vision_preset(name)
    ops = train_transform(16, randaug_layers=aug.randaug_layers,
                          randaug_magnitude=aug.randaug_magnitude).transforms
    randaug = [op for op in ops if isinstance(op, RandAugment)]
    # light1 keeps RandAugment at magnitude 0; only "none" has none
    assert len(randaug) == (0 if name == "none" else 1)


def test_augreg_presets_match_research_notes():
    if not RESEARCH_NOTES.is_file():
        pytest.skip(f"no research notes at {RESEARCH_NOTES} (only the workspace has ../shared)")
    row = next(line for line in RESEARCH_NOTES.read_text().splitlines()
               if line.startswith("| AugReg presets |"))
    notes = {}  # e.g. "none: no aug · light1: RA(2,0) · light2: RA(2,10)+mixup .2 · medium1: RA(2,15)+.2"
    for part in row.split("|")[3].split(" · "):
        name, spec = re.match(r"\s*(\w+): (.*)", part).groups()
        randaug = re.match(r"RA\((\d+),\s*(\d+)\)(?:\+(?:mixup )?(\d*\.\d+))?", spec)
        assert randaug or spec == "no aug", part
        notes[name] = (int(randaug[1]), int(randaug[2]), float(randaug[3] or 0)) if randaug else (0, 0, 0.0)
    assert notes == AUGREG_PRESETS


def test_flip_default_follows_the_source(tmp_path: Path):
    def flips(**kw) -> bool:
        data = build_data(DataConfig(img_size=16, augment="none", **kw))
        return any(isinstance(op, v2.RandomHorizontalFlip) for op in data.train_transform.transforms)

    # Digits are glyphs: a mirrored 2 is no digit, so no flips unless asked for.
    assert not flips(source="digits") and flips(source="digits", flip=True)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 9, 9)).save(tmp_path / c / f"{i}.png")
    folder = f"imagefolder:{tmp_path}"
    assert flips(source=folder, minival_fraction=0) and not flips(source=folder, flip=False,
                                                                  minival_fraction=0)


def test_preset_overrides_and_unknown():
    assert set(AUGREG_PRESETS) == set(BIG_VISION_RANDAUG_DEF)
    aug = resolve_augment(DataConfig(augment="strong2", randaug_layers=1, randaug_magnitude=7,
                                     mixup_alpha=0.0, cutmix_alpha=1.0))
    assert (aug.randaug_layers, aug.randaug_magnitude, aug.mixup_alpha, aug.cutmix_alpha) == (1, 7, 0.0, 1.0)
    assert resolve_augment(DataConfig(augment="light2", mixup_alpha=0.3)).randaug_magnitude == 10
    with pytest.raises(ConfigError) as exc:
        resolve_augment(DataConfig(augment="heavy"))
    message = _one_line(exc)
    assert "data.augment" in message and "strong2" in message and "light1" in message


def test_randaugment_level_zero_follows_big_vision():
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    for op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"):
        assert torch.equal(apply_op(img, op, 0.0), img), op
    assert torch.equal(apply_op(img, "Solarize", 0.0), 255 - img)  # threshold 0 inverts all
    assert torch.equal(apply_op(img, "Posterize", 0.0), img & 0x80)  # TF's shift clamps at 7
    assert torch.equal(apply_op(img, "Solarize", 10.0), img)


_GREY = (128, 128, 128)
_SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _pil_op(image: Image.Image, op: str, level: int, sign: int, centre: tuple[int, int]) -> Image.Image:
    """big_vision's op at `level` (TF autoaugment's level -> argument mapping, 224 px constants made
    relative to the side) done with PIL, whose ops TF's port imitates. `sign`: the random sign of a
    signed op; `centre`: Cutout's (row, column)."""
    frac, (w, h) = level / 10, image.size
    affine = {  # PIL maps each output pixel (x, y) to the input point (a x + b y + c, d x + e y + f)
        "ShearX": (1, sign * 0.3 * frac, 0, 0, 1, 0),  # TF's transform [1, level, 0, 0, 1, 0, ...]
        "ShearY": (1, 0, 0, sign * 0.3 * frac, 1, 0),
        "TranslateX": (1, 0, sign * frac * 100 / 224 * w, 0, 1, 0),  # TF: x reads x + pixels
        "TranslateY": (1, 0, 0, 0, 1, sign * frac * 100 / 224 * h)}
    if op in affine:
        return image.transform(image.size, Image.Transform.AFFINE, affine[op],
                               Image.Resampling.NEAREST, fillcolor=_GREY)
    if op == "Rotate":  # tfa.image.rotate and PIL both turn a positive angle counter-clockwise
        return image.rotate(sign * 30 * frac, Image.Resampling.NEAREST, fillcolor=_GREY)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, op)(image).enhance(1.8 * frac + 0.1)
    if op == "Cutout":  # TF: rows cy - pad .. cy + pad - 1 (columns alike), clipped to the image
        pad, (cy, cx) = int(frac * 40 / 224 * min(w, h)), centre
        out = image.copy()
        ImageDraw.Draw(out).rectangle((cx - pad, cy - pad, cx + pad - 1, cy + pad - 1), fill=_GREY)
        return out
    if op == "SolarizeAdd":  # no PIL op: TF's definition as a lookup table that PIL applies
        add = int(frac * 110)
        return image.point([min(v + add, 255) if v < 128 else v for v in range(256)] * 3)
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
            "Invert": ImageOps.invert, "Posterize": lambda im: ImageOps.posterize(im, int(frac * 4)),
            "Solarize": lambda im: ImageOps.solarize(im, int(frac * 256))}[op](image)


# Ops where vitscale (torchvision's functional ops) and PIL round differently: at most one grey
# level apart, on at most this share of the values (the worst case measured on these images, which
# are fixed: AutoContrast 0.253%, Color 30.17%, Contrast 39.60%, Sharpness 0.463%). TF's own ops round
# differently again (below), so neither library is big_vision's to the last grey level.
_PIL_ROUNDING = {
    # PIL evaluates x * scale + offset in double and truncates, so 254.99.. can become 254, typically
    # at a channel's max; vitscale's integer arithmetic is exact (asserted below).
    "AutoContrast": 0.0026,
    # the grey: PIL rounds (299 R + 587 G + 114 B) / 1000, torchvision floors 0.2989 R + 0.587 G +
    # 0.114 B (TF truncates that sum times 255.5 / 255, between the two)
    "Color": 0.302,
    # PIL blends towards its mean grey rounded to an integer, torchvision towards the float mean of
    # the floored greys (TF: pixel count / 256, the known deviation in transforms.py's docstring)
    "Contrast": 0.396,
    # the same blur (PIL's SMOOTH filter; TF truncates its blur where both round); PIL and TF blend
    # as blur + f (x - blur), torchvision as f x + (1 - f) blur: float32 rounding, then truncation
    "Sharpness": 0.0047,
}


@pytest.mark.parametrize("op", RANDAUG_OPS)
def test_randaugment_matches_pil(op, monkeypatch):
    changed = False
    signs = (1, -1) if op in _SIGNED_OPS else (1,)
    for (h, w), level, sign in itertools.product(((12, 12), (17, 31)), range(5, 11), signs):
        monkeypatch.setattr(transforms, "_signed", lambda value, s=sign: s * value)
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(100 * level + h))
        torch.manual_seed(level)
        got = apply_op(img, op, float(level))
        torch.manual_seed(level)  # Cutout's centre: apply_op's two draws, row then column
        centre = int(torch.randint(h, ())), int(torch.randint(w, ()))
        image = Image.fromarray(img.permute(1, 2, 0).numpy())
        want = torch.from_numpy(np.array(_pil_op(image, op, level, sign, centre))).permute(2, 0, 1)
        diff = (got.int() - want.int()).abs()
        case = (op, h, w, level, sign)
        if op in _PIL_ROUNDING:
            assert diff.max() <= 1 and (diff > 0).float().mean() <= _PIL_ROUNDING[op], case
        elif op == "Rotate" and level == 10:
            # sin 30 deg = 1/2 puts some source points exactly halfway between two pixels: PIL (and
            # TF) round those up, torchvision's grid_sample to even: 14 of 527 pixels at 17x31
            assert (diff.amax(0) > 0).sum() <= 14, case
        else:
            assert torch.equal(got, want), case
        if op == "AutoContrast":  # each channel's min -> 0 and max -> 255, exactly
            assert got.amin((1, 2)).tolist() == [0, 0, 0] and got.amax((1, 2)).tolist() == [255] * 3
        changed |= not torch.equal(got, img)
    assert changed, op  # the comparison saw the op do something


# ---------------------------------------------------------------------------------- stream
def _stream(cfg: DataConfig, start: int, count: int, batch_size: int):
    data = build_data(cfg, seed=5)
    out = []
    for step, epoch, x, y in data.train_batches(start_step=start, batch_size=batch_size):
        out.append((step, epoch, x, y))
        if len(out) == count:
            return out
    raise AssertionError("stream ended")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_identical(workers):
    # a small train split (the rest is minival) keeps this fast: 144 // 32 = 4 steps per epoch
    cfg = DataConfig(source="digits", img_size=12, augment="medium2", minival_fraction=0.9)
    b = 32
    reference = _stream(cfg, 0, 7, b)
    assert [(s, e) for s, e, _, _ in reference] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
    cfg.num_workers = workers
    resumed = _stream(cfg, 2, 5, b)  # resumes mid-epoch and crosses the epoch boundary
    for (s0, e0, x0, y0), (s1, e1, x1, y1) in zip(reference[2:], resumed, strict=True):
        assert (s0, e0) == (s1, e1)
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert not torch.equal(reference[0][3], reference[4][3])  # a new order each epoch


def test_epoch_order_is_a_permutation():
    batches = iter(BatchStream(n=10, batch_size=3, seed=1, start_step=0))
    epoch0 = [next(batches) for _ in range(3)]  # drop_last: 3 batches, 9 of 10 items
    items = [i for batch in epoch0 for e, i in batch]
    assert len(set(items)) == 9 and all(e == 0 for batch in epoch0 for e, _ in batch)
    assert next(batches)[0][0] == 1


# ---------------------------------------------------------------------------------- mixing
def test_mixup_matches_hand_computation():
    x = torch.randn(4, 3, 5, 5)
    y = torch.tensor([0, 1, 2, 3])
    mixed, targets, lam = mixup(x, y, 5, 0.4, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    b = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (), generator=gen))).beta(0.4, 0.4)
    assert lam == pytest.approx(max(b, 1 - b)) and lam >= 0.5
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[[3, 0, 1, 2]])
    expected = torch.zeros(4, 5)
    for i in range(4):
        expected[i, y[i]] += lam
        expected[i, y[i - 1]] += 1 - lam  # rolled by one: example i mixes with i - 1
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    again, again_t, _ = mixup(x, y, 5, 0.4, torch.Generator().manual_seed(7))
    assert torch.equal(again, mixed) and torch.equal(again_t, targets)


def test_cutmix_lambda_is_the_kept_area():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 10, 10).clone()
    y = torch.tensor([1, 0, 3, 2])
    mixed, targets, lam = cutmix(x, y, 4, 1.0, torch.Generator().manual_seed(3))
    kept = (mixed[0] == 0).float().mean().item()  # example 0's own pixels; the rest come from example 3
    assert (mixed[0] == 3).float().mean().item() == pytest.approx(1 - kept)
    assert lam == pytest.approx(kept) and 0 < lam < 1
    assert targets[0, 1] == pytest.approx(lam) and targets[0, 2] == pytest.approx(1 - lam)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    again = cutmix(x, y, 4, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and again[2] == lam


class _Fixed:
    """A distribution whose sample is always `value` (torchvision's CutMix draws lam from one)."""

    def __init__(self, value: float):
        self.value = value

    def sample(self, shape=()):
        return torch.tensor([self.value])


def test_cutmix_matches_torchvision(monkeypatch):
    from torchvision.transforms.v2 import CutMix

    height, width, classes = 10, 14, 5  # H != W tells torchvision's two centre draws apart
    x = torch.rand(4, 3, height, width)
    y = torch.tensor([4, 0, 3, 3])
    # cuts int(side * sqrt(1 - lam)) of 13x9 .. 1x1 px, odd ones too; lam 0.99 gives an empty box
    lams = (0.03, 0.2, 0.37, 0.5, 0.81, 0.99)
    centres = [(0, 0), (0, 13), (9, 0), (9, 13), (4, 6), (5, 7), (1, 12), (8, 2)]  # corners clip
    for lam, (cy, cx) in itertools.product(lams, centres):
        # vitscale: lam from _beta, the centre from the generator (row, then column)
        monkeypatch.setattr(mixing, "_beta", lambda alpha, gen, lam=lam: lam)
        gen = torch.Generator()
        monkeypatch.setattr(torch, "randint", lambda high, size, generator=None, cy=cy, cx=cx:
                            torch.tensor(cy if high == height else cx))
        mixed, targets, kept = cutmix(x, y, classes, 1.0, gen)
        # torchvision: lam from its Beta distribution, the centre from torch.randint (x, then y)
        transform = CutMix(alpha=1.0, num_classes=classes)
        transform._dist = _Fixed(lam)
        monkeypatch.setattr(torch, "randint", lambda high, size, cy=cy, cx=cx:
                            torch.tensor([cy if high == height else cx]))
        tv_mixed, tv_targets = transform(x, y)
        monkeypatch.undo()
        assert torch.equal(mixed, tv_mixed) and torch.equal(targets, tv_targets), (lam, cy, cx)
        assert kept == pytest.approx(targets[0, 4].item())  # lam is the kept area
        assert torch.equal(mixed, x) == (lam == 0.99)  # a box was pasted, but for the empty one


def test_mix_batch_reproducible_and_plain():
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6,))
    a = mix_batch(x, y, 3, torch.Generator().manual_seed(1), 0.8, 1.0)
    b = mix_batch(x, y, 3, torch.Generator().manual_seed(1), 0.8, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].shape == (6, 3)
    torch.testing.assert_close(a[1].sum(1), torch.ones(6))
    plain_x, plain_t = mix_batch(x, y, 3, torch.Generator().manual_seed(1))
    assert plain_x is x and torch.equal(plain_t, torch.nn.functional.one_hot(y, 3).float())


# ---------------------------------------------------------------------------------- bad data
def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _noise(seed: int, size: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "cat" / "good1.jpg", _noise(1))
    _save(root / "cat" / "good3.jpg", _noise(3))
    _save(root / "cat" / "cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 0, 0)))
    _save(root / "cat" / "deep" / "gray16.png",
          Image.fromarray(np.full((20, 20), 257 * 100, dtype=np.uint16)))
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / "dog" / "good2.png", _noise(2))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 10, 20))
    _save(root / "dog" / "palette.png", palette, transparency=0)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 10, 20))
    _save(root / "dog" / "rgba.png", rgba)
    (root / "dog" / "truncated.png").write_bytes(_png_bytes(_noise(4, 64))[:3000])
    return root


def test_decode_converts_modes_to_rgb(messy_folder: Path):
    cmyk = decode_image(messy_folder / "cat" / "cmyk.jpg")
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk)[5, 5].astype(int) - [255, 0, 255]).max() < 8
    gray16 = decode_image(messy_folder / "cat" / "deep" / "gray16.png")
    assert gray16.mode == "RGB" and tuple(np.asarray(gray16)[3, 3]) == (100, 100, 100)
    palette = np.asarray(decode_image(messy_folder / "dog" / "palette.png"))
    assert tuple(palette[5, 2]) == (200, 0, 0) and tuple(palette[5, 15]) == (255, 255, 255)  # on white
    rgba = np.asarray(decode_image(messy_folder / "dog" / "rgba.png"))
    assert tuple(rgba[5, 2]) == (0, 255, 0) and tuple(rgba[5, 15]) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    assert tuple(np.asarray(decode_image(_png_bytes(la)))[0, 0]) == (255, 255, 255)
    assert decode_image(_png_bytes(Image.new("L", (2, 2), 77))).getpixel((0, 0)) == (77, 77, 77)


def test_imagefolder_skips_and_counts(messy_folder: Path):
    cfg = DataConfig(source=f"imagefolder:{messy_folder}", img_size=16, minival_fraction=0.0,
                     max_skip_fraction=0.3, batch_size=4)
    data = build_data(cfg, seed=0)
    assert data.class_names == ["cat", "dog"] and len(data.train) == 9 and data.test is None
    assert data.eval_loader("test") is None and data.eval_loader("minival") is None
    seen = sum(len(y) for _, y in data.eval_loader("train", 4))
    assert seen == 7 and data.skipped == 2
    assert [Path(k.split(" (")[0]).name for k in data.unreadable()] == ["corrupt.jpg", "truncated.png"]
    # training batches stay whole: an unreadable item is replaced by the next readable one
    for step, _, x, y in data.train_batches(batch_size=4):
        assert x.shape == (4, 3, 16, 16) and len(y) == 4
        if step == 3:
            break
    assert data.skipped == 2  # distinct files, not occurrences


def test_imagefolder_skip_limit(messy_folder: Path):
    cfg = DataConfig(source=f"imagefolder:{messy_folder}", img_size=16, minival_fraction=0.0,
                     max_skip_fraction=0.1)
    data = build_data(cfg, seed=0)
    with pytest.raises(DataError) as exc:
        for _ in data.eval_loader("train", 9):
            pass
    assert "max_skip_fraction=0.1" in _one_line(exc)


def test_imagefolder_layout_errors(tmp_path: Path, messy_folder: Path):
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source=f"imagefolder:{tmp_path / 'nowhere'}"))
    assert "does not exist" in _one_line(exc)
    (messy_folder / "empty_class").mkdir()
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source=f"imagefolder:{messy_folder}"))
    assert "empty_class" in _one_line(exc) and "no images" in str(exc.value)
    broken = tmp_path / "broken" / "only"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"nope")
    (broken / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source=f"imagefolder:{broken.parent}"))
    assert "can be decoded" in _one_line(exc)
    with pytest.raises(DataError):
        build_data(DataConfig(source="nosuchsource:x"))


def test_imagefolder_train_val_layout(tmp_path: Path):
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _save(tmp_path / split / c / f"{i}.png", _noise(i, 40))
    data = build_data(DataConfig(source=f"imagefolder:{tmp_path}", img_size=16, minival_fraction=0.25), 0)
    assert (len(data.train), len(data.minival), len(data.test)) == (9, 3, 4)
    assert not data.resize_only  # 40 px images at 16 px: resize to 18, center-crop 16
    x, y = next(iter(data.eval_loader("test", 8)))
    assert x.shape == (4, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------- webdataset
def _write_shards(folder: Path, shards: int = 4, per_shard: int = 3) -> None:
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(per_shard):
                index = s * per_shard + k
                members = {f"s{index:04d}.png": _png_bytes(_noise(index, 10)),
                           f"s{index:04d}.cls": str(index).encode()}
                if index == 5:
                    del members[f"s{index:04d}.cls"]  # unusable: no label
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_source(tmp_path: Path):
    _write_shards(tmp_path)
    pattern = str(tmp_path / "shard-{000..003}.tar")
    assert expand_braces(pattern)[-1].endswith("shard-003.tar") and len(expand_braces(pattern)) == 4
    assert expand_braces("a{1..2}-{x,y}") == ["a1-x", "a1-y", "a2-x", "a2-y"]
    data = build_data(DataConfig(source=f"webdataset:{pattern}", img_size=8, minival_fraction=0.0,
                                 max_skip_fraction=0.2), seed=0)
    labels = [data.train[i][1] for i in range(len(data.train))]
    assert labels == [i for i in range(12) if i != 5] and data.num_classes == 12
    assert data.skipped == 1 and "s0005" in data.unreadable()[0]
    image, _ = data.train[3]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(_noise(3, 10)))
    _, _, x, y = next(data.train_batches(batch_size=5))
    assert x.shape == (5, 3, 8, 8)

    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source=f"webdataset:{tmp_path / 'missing-{0..1}.tar'}"))
    assert "does not exist" in _one_line(exc)


# ---------------------------------------------------------------------------------- hf
def test_hf_source_from_disk(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=["round", "square"])})

    def split(n: int, offset: int):
        images = [{"bytes": _png_bytes(_noise(offset + i, 12)), "path": None} for i in range(n)]
        return datasets.Dataset.from_dict({"picture": images, "kind": [i % 2 for i in range(n)]},
                                          features=features)

    train = split(10, 0)
    train = train.cast_column("picture", datasets.Image(decode=False))
    rows = train.to_dict()
    rows["picture"][4] = {"bytes": b"\x89PNG broken", "path": None}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": split(4, 50)}).save_to_disk(str(tmp_path / "ds"))
    data = build_data(DataConfig(source=f"hf:{tmp_path / 'ds'}", img_size=8, minival_fraction=0.2,
                                 max_skip_fraction=0.5), seed=0)
    assert data.class_names == ["round", "square"] and len(data.test) == 4
    assert len(data.train) + len(data.minival) == 10
    assert sum(len(y) for _, y in data.eval_loader("test", 3)) == 4
    seen = sum(len(y) for _, y in data.eval_loader("train", 3)) + sum(
        len(y) for _, y in data.eval_loader("minival", 3))
    assert seen == 9 and data.skipped == 1
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source=f"hf:{tmp_path / 'ds'}?image=nope"))
    assert "nope" in _one_line(exc)


def test_hf_without_datasets_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source="hf:anything"))
    assert "pip install datasets" in _one_line(exc)


# ---------------------------------------------------------------------------------- torchvision
def test_torchvision_offline_is_one_line_error(monkeypatch, tmp_path: Path):
    import torchvision.datasets

    class OfflineCIFAR10:
        def __init__(self, root, train=True, transform=None, download=False):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(source="torchvision:CIFAR10", root=str(tmp_path)))
    message = _one_line(exc)
    assert "CIFAR10" in message and str(tmp_path) in message and "download" in message


def test_torchvision_source_with_local_files(monkeypatch, tmp_path: Path):
    import torchvision.datasets

    class TinyMNIST:  # what an MNIST with its files present behaves like: PIL "L" images
        classes = [f"{d} - digit" for d in range(3)]

        def __init__(self, root, train=True, transform=None, download=False):
            self.targets = torch.tensor([0, 1, 2] * (4 if train else 1))

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return Image.new("L", (28, 28), int(i) * 10), int(self.targets[i])

    monkeypatch.setattr(torchvision.datasets, "TinyMNIST", TinyMNIST, raising=False)
    data = build_data(DataConfig(source="torchvision:TinyMNIST", root=str(tmp_path), img_size=28,
                                 minival_fraction=0.25), seed=0)
    assert data.num_classes == 3 and (len(data.train), len(data.minival), len(data.test)) == (9, 3, 3)
    assert sorted(data.minival.labels) == [0, 1, 2]  # stratified
    x, y = next(iter(data.eval_loader("test", 3)))
    assert x.shape == (3, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])  # grey copied to RGB
