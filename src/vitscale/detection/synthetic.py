"""A generated detection set: coloured shapes on noise, with COCO annotations.

`make_shapes(out_dir, num_images, size, seed)` writes `out_dir/images/NNNNNN.png` and
`out_dir/annotations.json` (COCO: images, annotations with [x, y, w, h] boxes, categories
square / circle / triangle as ids 1 / 2 / 3) and returns the `coco:IMAGES_DIR,ANNOTATIONS.json`
source string that `vitscale detect` reads. Each image holds 1 .. max_objects shapes whose
boxes do not overlap, side lengths in [min_side, max_side] pixels, saturated colours on
low-contrast grey noise; the same seed gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vitscale.errors import ConfigError
from vitscale.utils.io import atomic_write_text

CATEGORIES = ("square", "circle", "triangle")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # One channel high, one low, one anywhere: clearly coloured against the grey background.
    values = [int(rng.integers(200, 256)), int(rng.integers(0, 60)), int(rng.integers(0, 256))]
    order = rng.permutation(3)
    return tuple(values[i] for i in order)  # type: ignore[return-value]


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]],
              gap: int = 2) -> bool:
    x, y, w, h = box
    return any(x < bx + bw + gap and bx < x + w + gap and y < by + bh + gap and by < y + h + gap
               for bx, by, bw, bh in boxes)


def make_shapes(out_dir: str | Path, num_images: int = 16, size: int | tuple[int, int] = 128,
                seed: int = 0, max_objects: int = 3, min_side: int | None = None,
                max_side: int | None = None) -> str:
    """Write the shapes set to `out_dir`; returns its `coco:IMAGES,ANNOTATIONS` source."""
    from PIL import Image, ImageDraw

    height, width = (size, size) if isinstance(size, int) else size
    min_side = min_side or max(8, min(height, width) // 8)
    max_side = max_side or max(min_side, min(height, width) * 3 // 8)
    if num_images < 1 or max_objects < 1 or not 4 <= min_side <= max_side <= min(height, width):
        raise ConfigError(f"make_shapes: need num_images >= 1, max_objects >= 1 and 4 <= min_side "
                          f"<= max_side <= the image side, got {num_images}, {max_objects}, "
                          f"{min_side}, {max_side} for {height}x{width}")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(num_images):
        noise = rng.normal(110, 25, size=(height, width, 1)) + rng.normal(0, 12, (height, width, 3))
        img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[int, int, int, int]] = []
        wanted = int(rng.integers(1, max_objects + 1))
        for _ in range(50 * wanted):  # rejection sampling of non-overlapping boxes
            if len(boxes) == wanted:
                break
            kind = int(rng.integers(len(CATEGORIES)))
            w = int(rng.integers(min_side, max_side + 1))
            h = w if kind == 1 else int(rng.integers(min_side, max_side + 1))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if _overlaps((x, y, w, h), boxes):
                continue
            colour = _colour(rng)
            # Pixel cells x .. x + w - 1 are painted: the box [x, y, w, h] covers them exactly.
            if kind == 0:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
            elif kind == 1:
                draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colour)
            else:
                draw.polygon([(x + (w - 1) / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=colour)
            boxes.append((x, y, w, h))
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": kind + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
        name = f"{index:06d}.png"
        img.save(images_dir / name)
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]}
    ann = out / "annotations.json"
    atomic_write_text(ann, json.dumps(doc))
    return f"coco:{images_dir},{ann}"


def main(argv: list[str] | None = None) -> int:
    """`python -m vitscale.detection.synthetic DIR [--images N] [--size PX] [--seed S]`."""
    import argparse
    import sys

    from vitscale.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m vitscale.detection.synthetic",
                                 description="Write the shapes detection set (PNG + COCO JSON).")
    ap.add_argument("out_dir")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(make_shapes(args.out_dir, args.images, args.size, args.seed))
    except UserError as exc:
        print(f"shapes: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
