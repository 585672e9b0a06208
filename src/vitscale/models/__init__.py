"""The ViT model family: one `ModelConfig`, named sizes, weights in and out."""

from vitscale.models.config import ModelConfig
from vitscale.models.registry import SIZES, create_model, list_models, model_config
from vitscale.models.vit import VisionTransformer

__all__ = ["SIZES", "ModelConfig", "VisionTransformer", "create_model", "list_models", "model_config"]
