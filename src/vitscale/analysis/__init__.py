"""What a ViT learned and why it predicts: the ViT paper's embedding-filter PCA, position
embedding similarity, mean attention distance and attention rollout, Integrated Gradients
(captum) and accuracy / calibration under corruptions, on any checkpoint vitscale loads
(`vitscale analyze`). Attention probabilities are computed only inside `record_attention`."""

from vitscale.analysis.api import ANALYSES, analyze_checkpoint, analyze_model, parse_what
from vitscale.analysis.attention import (
    attention_distance,
    attention_rollout,
    layer_distance,
    mean_attention_distance,
    record_attention,
    rollout,
    token_centres,
)
from vitscale.analysis.attribution import integrated_gradients
from vitscale.analysis.embeddings import (
    filter_components,
    patch_kernels,
    posemb_similarity,
    position_table,
)
from vitscale.analysis.robustness import CORRUPTIONS, SEVERITY_PARAMS, corrupt, robustness

__all__ = [
    "ANALYSES", "CORRUPTIONS", "SEVERITY_PARAMS", "analyze_checkpoint", "analyze_model",
    "attention_distance", "attention_rollout", "corrupt", "filter_components",
    "integrated_gradients", "layer_distance", "mean_attention_distance", "parse_what",
    "patch_kernels", "posemb_similarity", "position_table", "record_attention", "robustness",
    "rollout", "token_centres",
]
