"""Detection with ViT and As-ViT backbones in torchvision's detectors (ViTDet's simple feature
pyramid, an FPN on As-ViT's stages), COCO-format data and a generated shapes set."""

from vitscale.detection.backbone import (
    DETECTORS,
    anchor_generator,
    asvit_backbone,
    detector,
    roi_pooler,
    vitdet_backbone,
)

__all__ = ["DETECTORS", "anchor_generator", "asvit_backbone", "detector", "roi_pooler",
           "vitdet_backbone"]
