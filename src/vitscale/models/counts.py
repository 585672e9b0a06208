"""Analytic parameter and FLOP counts of a `ModelConfig`, without building the model.

FLOPs are 2 x multiply-accumulates of the matmuls and convolutions of one forward pass of one
image (elementwise ops, norms and softmax are not counted), the convention of
`torch.utils.flop_counter` and of the papers' GFLOPs tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitscale.models.config import ModelConfig, pair


@dataclass(frozen=True)
class Counts:
    params: int
    flops: int  # per image, forward

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(dim: int, bias: bool) -> int:
    return dim + (dim if bias else 0)


def block_params(cfg: ModelConfig) -> int:
    d, m, hd = cfg.width, cfg.mlp_dim, cfg.head_dim
    p = _norm(d, cfg.norm_bias)  # norm1 (shared by both branches of a parallel block)
    p += _linear(d, 3 * d, cfg.qkv_bias) + _linear(d, d, cfg.proj_bias)
    if cfg.qk_norm:
        p += 2 * _norm(hd, cfg.norm_bias)
    if cfg.block == "sequential":
        p += _norm(d, cfg.norm_bias)
    p += _linear(d, m, cfg.mlp_bias) + _linear(m, d, cfg.mlp_bias)
    return p


def block_flops(cfg: ModelConfig, tokens: int) -> int:
    d, m = cfg.width, cfg.mlp_dim
    dense = 3 * d * d + d * d + 2 * d * m
    attention = 2 * tokens * d  # QK^T and AV: tokens x tokens x head_dim, summed over heads
    return 2 * tokens * (dense + attention)


def window_block_flops(cfg: ModelConfig, grid: tuple[int, int]) -> int:
    """A block with window attention (`window_size`): qkv and proj on the grid padded to whole
    windows (the padding is computed) and on the prefix tokens, attention inside each window
    and among the prefix tokens, the MLP on the real tokens."""
    d, m, w = cfg.width, cfg.mlp_dim, cfg.window_size
    padded = -(-grid[0] // w) * w * (-(-grid[1] // w) * w)
    prefix = cfg.num_prefix_tokens
    attention = 2 * d * (padded * w * w + prefix * prefix)
    return 2 * ((padded + prefix) * 4 * d * d + (grid[0] * grid[1] + prefix) * 2 * d * m + attention)


def map_head_counts(cfg: ModelConfig, tokens: int) -> Counts:
    d, m = cfg.width, cfg.map_mlp_dim or cfg.mlp_dim
    params = d  # probe
    params += _linear(d, d, cfg.qkv_bias) + _linear(d, 2 * d, cfg.qkv_bias)
    params += _linear(d, d, cfg.proj_bias) + _norm(d, cfg.norm_bias)
    params += _linear(d, m, cfg.mlp_bias) + _linear(m, d, cfg.mlp_bias)
    flops = 2 * (d * d + tokens * 2 * d * d + 2 * tokens * d + d * d + 2 * d * m)
    return Counts(params, flops)


def count(cfg: ModelConfig, img_size: int | tuple[int, int] | None = None) -> Counts:
    """Parameters and forward FLOPs per image of the model `cfg` at `img_size`."""
    h, w = pair(img_size) if img_size is not None else cfg.img_size
    d = cfg.width
    patches = (h // cfg.patch[0]) * (w // cfg.patch[1])
    tokens = patches + cfg.num_prefix_tokens

    if cfg.stem == "hybrid":
        from vitscale.models.hybrid import hybrid_counts

        params, flops = hybrid_counts(cfg, (h, w))
    else:
        ph, pw = cfg.patch
        params = _linear(cfg.in_chans * ph * pw, d, True)
        flops = 2 * patches * cfg.in_chans * ph * pw * d
    params += (int(bool(cfg.class_token)) + int(cfg.dist_token)) * d
    if cfg.posemb == "learn":
        params += (cfg.num_patches + cfg.posemb_prefix_rows) * d

    params += cfg.depth * block_params(cfg)
    windowed = sum(cfg.windowed(i) for i in range(cfg.depth))
    flops += (cfg.depth - windowed) * block_flops(cfg, tokens)
    if windowed:
        flops += windowed * window_block_flops(cfg, (h // cfg.patch[0], w // cfg.patch[1]))
    params += _norm(d, cfg.norm_bias)  # final norm (on tokens, or on the pooled vector)

    if cfg.pool == "map":
        head = map_head_counts(cfg, tokens)
        params += head.params
        flops += head.flops
    per_position = tokens if cfg.pool == "none" else 1  # pool "none" applies the head per token
    feat = d
    if cfg.head_hidden:
        params += _linear(d, cfg.head_hidden, True)
        flops += 2 * per_position * d * cfg.head_hidden
        feat = cfg.head_hidden
    heads = (1 + int(cfg.dist_token)) if cfg.num_classes > 0 else 0  # DeiT: a second head
    params += heads * _linear(feat, cfg.num_classes, True)
    flops += heads * 2 * per_position * feat * cfg.num_classes
    return Counts(params, flops)
