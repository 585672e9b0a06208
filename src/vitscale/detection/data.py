"""COCO-format detection data: `coco:IMAGES_DIR,ANNOTATIONS.json` through torchvision's
`CocoDetection` (pycocotools, the `vitscale[detection]` extra), checked before anything runs.

Handling of what a hand-made annotation file can get wrong:

* a missing or unreadable file, invalid JSON, missing `images` / `annotations` / `categories`,
  an image entry without id / file_name / width / height, an image file that is not there, an
  annotation naming an unknown image or category, a box that is not four finite numbers with a
  positive width and height, or one that lies wholly outside its image: a one-line `DataError`
  naming the file, the entry and the fix, before training starts;
* a box that extends past the image border: clipped to the image for training (counted in
  `clipped`, reported once); evaluation compares against the file's own boxes;
* `iscrowd: 1` annotations are not training targets; COCO evaluation treats them as regions
  where detections are neither rewarded nor punished (pycocotools' rule);
* images without annotations stay in the set (negatives).

Category ids of any numbering map to labels 1 .. K in sorted id order (0 is torchvision's
background); `category_ids[label - 1]` maps back.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import torch

from vitscale.errors import ConfigError, DataError
from vitscale.utils.io import read_json

PREFIX = "coco:"
EXTRA_HINT = "pip install 'vitscale[detection]' (pycocotools)"


def require_pycocotools() -> None:
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise ConfigError(f"COCO data and mAP need pycocotools; {EXTRA_HINT}") from None


def parse_source(source: str) -> tuple[Path, Path]:
    """'coco:IMAGES_DIR,ANNOTATIONS.json' -> (images dir, annotation file), both checked."""
    body = source[len(PREFIX):] if source.startswith(PREFIX) else None
    parts = body.split(",") if body else []
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"detection data {source!r} is not coco:IMAGES_DIR,ANNOTATIONS.json")
    images, ann = Path(parts[0].strip()), Path(parts[1].strip())
    if not images.is_dir():
        raise DataError(f"image folder {images} (from {source!r}) does not exist")
    if not ann.is_file():
        raise DataError(f"annotation file {ann} (from {source!r}) does not exist; give the COCO "
                        "JSON after the comma")
    return images, ann


def _load_json(ann: Path) -> dict[str, Any]:
    doc = read_json(ann, DataError, "give a COCO detection annotation file")
    if not isinstance(doc, dict):
        raise DataError(f"{ann} must hold a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{ann} has no '{key}' list; a COCO detection file needs images, "
                            "annotations and categories")
    return doc


def check_annotations(doc: dict[str, Any], ann: Path, images_dir: Path) -> int:
    """Raise a one-line DataError for the first problem in a COCO document; returns how many
    boxes extend past their image (to be clipped)."""
    sizes: dict[Any, tuple[float, float]] = {}
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= set(img):
            raise DataError(f"{ann}: images[{i}] needs id, file_name, width and height")
        if not (images_dir / img["file_name"]).is_file():
            missing = sum(not (images_dir / m["file_name"]).is_file() for m in doc["images"])
            raise DataError(f"{ann}: image file {images_dir / img['file_name']} does not exist "
                            f"({missing} of {len(doc['images'])} missing); check IMAGES_DIR")
        sizes[img["id"]] = (float(img["width"]), float(img["height"]))
    cats = {c.get("id") for c in doc["categories"] if isinstance(c, dict)}
    clipped = 0
    for i, a in enumerate(doc["annotations"]):
        name = f"{ann}: annotation {a.get('id', f'#{i}') if isinstance(a, dict) else f'#{i}'}"
        if not isinstance(a, dict) or a.get("image_id") not in sizes:
            raise DataError(f"{name} names no image of the file (image_id "
                            f"{a.get('image_id') if isinstance(a, dict) else None!r})")
        if a.get("category_id") not in cats:
            raise DataError(f"{name} has category_id {a.get('category_id')!r}, not one of the "
                            f"categories {sorted(cats)}")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                and box[2] > 0 and box[3] > 0):
            raise DataError(f"{name} has bbox {box!r}; write [x, y, width, height] with a "
                            "positive width and height")
        w, h = sizes[a["image_id"]]
        x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
        if min(x1, w) <= max(x0, 0) or min(y1, h) <= max(y0, 0):
            raise DataError(f"{name} has bbox {box} outside its {w:g}x{h:g} image "
                            f"{a['image_id']}; fix or remove it")
        clipped += x0 < 0 or y0 < 0 or x1 > w or y1 > h
    return clipped


class CocoSet(torch.utils.data.Dataset):
    """A checked COCO detection set. Item i: (image (3, H, W) float in [0, 1], target with
    `boxes` (N, 4) xyxy clipped to the image, `labels` (N,) in 1..K, `image_id`)."""

    def __init__(self, source: str) -> None:
        from torchvision.datasets import CocoDetection

        require_pycocotools()
        self.source = source
        images_dir, ann = parse_source(source)
        doc = _load_json(ann)
        self.clipped = check_annotations(doc, ann, images_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco_detection = CocoDetection(str(images_dir), str(ann))
        cats = sorted(self.coco_detection.coco.cats.values(), key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.ids = list(self.coco_detection.ids)

    @property
    def coco(self):
        """The pycocotools COCO object of the annotation file (ground truth for evaluation)."""
        return self.coco_detection.coco

    @property
    def num_classes(self) -> int:
        """Object classes + 1 (the background), torchvision's num_classes."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision.transforms.v2.functional import pil_to_tensor

        image, anns = self.coco_detection[index]
        pixels = pil_to_tensor(image.convert("RGB")).float() / 255.0
        h, w = pixels.shape[-2:]
        boxes, labels = [], []
        for a in anns:
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            boxes.append([max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)])
            labels.append(self.label_of[a["category_id"]])
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "image_id": torch.tensor(self.ids[index])}
        return pixels, target


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The image mirrored left-right, with its boxes."""
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}
