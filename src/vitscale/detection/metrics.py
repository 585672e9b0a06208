"""COCO box mAP of a torchvision detector on a `CocoSet`, by pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from vitscale.detection.data import CocoSet, require_pycocotools


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoSet, device: torch.device | str = "cpu",
            batch_size: int = 4) -> list[dict[str, Any]]:
    """COCO result entries (image_id, category_id, bbox [x, y, w, h], score) for every image."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            outputs = model([image.to(device) for image, _ in items])
            for (_, target), out in zip(items, outputs):
                image_id = int(target["image_id"])
                boxes = out["boxes"].cpu()
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
                for box, score, label in zip(xywh.tolist(), out["scores"].tolist(),
                                             out["labels"].tolist()):
                    results.append({"image_id": image_id,
                                    "category_id": dataset.category_ids[int(label) - 1],
                                    "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    finally:
        model.train(was_training)
    return results


def coco_map(dataset: CocoSet, results: list[dict[str, Any]]) -> dict[str, float]:
    """{"ap": AP@[.5:.95], "ap50", "ap75", "ap_small", "ap_medium", "ap_large"} of `results`
    against the dataset's annotations (all 0 without any detection; -1 where COCO has no
    ground truth of that size)."""
    require_pycocotools()
    from pycocotools.cocoeval import COCOeval

    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    if not results:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        detections = dataset.coco.loadRes(results)
        evaluator = COCOeval(dataset.coco, detections, "bbox")
        evaluator.params.imgIds = list(dataset.ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(keys, evaluator.stats[:6])}


def evaluate_detector(model: torch.nn.Module, dataset: CocoSet, device: torch.device | str = "cpu",
                      batch_size: int = 4) -> dict[str, float]:
    """COCO box mAP of `model` on `dataset` (see `coco_map`), with the number of images."""
    metrics = coco_map(dataset, predict(model, dataset, device, batch_size))
    metrics["images"] = len(dataset)
    return metrics
