"""The ViT model family: one `ModelConfig`, named sizes, weights in and out."""

from vitscale.models.config import ModelConfig
from vitscale.models.counts import Counts, count
from vitscale.models.registry import SIZES, create_model, list_models, model_config
from vitscale.models.vit import VisionTransformer
from vitscale.models.weights import load, read_checkpoint, save

__all__ = [
    "SIZES",
    "Counts",
    "ModelConfig",
    "VisionTransformer",
    "count",
    "create_model",
    "list_models",
    "load",
    "model_config",
    "read_checkpoint",
    "save",
]
