"""Training-free architecture measures and search (As-ViT)."""

from vitscale.search.complexity import curve_length, ntk_condition_number, without_layernorm

__all__ = ["curve_length", "ntk_condition_number", "without_layernorm"]
