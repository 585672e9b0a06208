"""Bytes autograd keeps between forward and backward for a ViT, in closed form.

Per block, with T = B x N x D elements of the residual stream (B images, N tokens), M the MLP
width, H heads, each saved tensor counted once per storage (views share it):

- compute dtype s (2 under bf16 autocast or FSDP bf16 parameters, else 4) for what the matmuls
  read: the qkv / fc1 input, the qkv output (q, k, v are views of it), the attention output,
  the GELU input and fc2 input (M wide); residual dtype r (fp32 under autocast, which leaves
  additions and LayerNorm in fp32) for each LayerNorm input, plus 8 bytes of fp32 mean / rstd
  per token and LayerNorm;
- fused attention (flash / memory-efficient / cuDNN) saves q, k, v, the output and an fp32
  logsumexp per head and query; math attention saves the scaled query, the transposed key, a
  copy of v, the (B, H, N, N) probabilities and a copy of the output, in fp32 on CPU (where it
  upcasts bf16) and in s on CUDA;
- QK-norm keeps the qkv output (its LayerNorms read views of it), per-head statistics, the
  normalised q and k, and a copy of the attention output (its layout no longer matches);
- a parallel block reads one LayerNorm output twice (twice cast under autocast);
- dropout keeps a 1-byte mask per element it drops.

Activation checkpointing keeps a checkpointed block's input only; backward recomputes one
block at a time, so the peak adds the largest block's activations once. Backward also holds a
block's gradient temporaries (its MLP hidden gradient, two residual-stream gradients). Tensor parallelism
splits everything between the column-wise and the row-wise layers by tp (heads, the MLP
width); sequence parallelism splits the rest (norms, residual) by tp too.

tests/test_plan_activations.py compares these figures with what
`torch.autograd.graph.saved_tensors_hooks` sees in real forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class Precision:
    """Bytes per element: s for what the matmuls read, r for the residual stream."""

    compute: int
    residual: int
    autocast: bool

    @classmethod
    def of(cls, precision: str, param_dtype: str = "float32") -> Precision:
        if param_dtype == "bfloat16":  # FSDP casts parameters and inputs: all of it bf16
            return cls(2, 2, precision == "bf16")
        if precision == "bf16":
            return cls(2, FP32, True)
        return cls(FP32, FP32, False)


@dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int
    width: int
    mlp: int
    heads: int


def _split(n: float, tp: int) -> float:
    return n / tp


def block_bytes(cfg, shape: Shape, prec: Precision, kernel: str, device: str = "cuda",
                tp: int = 1, sp: bool = False) -> float:
    """Saved bytes of one transformer block of cfg (a ModelConfig) in training."""
    b, n, d, m, h = shape.batch, shape.tokens, shape.width, shape.mlp, shape.heads
    s, r = prec.compute, prec.residual
    t = b * n * d
    seq = tp if sp else 1  # what sequence parallelism splits: norms, residual, dropout on it
    attn_dtype = FP32 if kernel == "math" and device == "cpu" and s < FP32 else s
    out = 0.0
    ln = r * t + 8 * b * n  # one LayerNorm's input and statistics
    # norms and the tensors they feed (the column-wise inputs are gathered: whole under TP)
    if cfg.block == "parallel":
        out += ln / seq
        out += (2 if prec.autocast else 1) * s * t  # the shared LayerNorm output (cast twice)
    else:
        out += 2 * ln / seq
        out += 2 * s * t  # qkv input, fc1 input
    # attention, split by heads under TP
    heads = h / tp
    tt = t / tp
    if cfg.qk_norm:
        out += 3 * s * tt + 16 * b * heads * n  # qkv output, q / k norm statistics
        if kernel == "math":
            out += 3 * attn_dtype * tt + attn_dtype * b * heads * n * n
        else:
            out += 2 * s * tt + s * tt + FP32 * b * heads * n  # q, k normalised; out; lse
        out += s * tt  # the output copied to the projection's layout
    elif kernel == "math":
        out += 3 * attn_dtype * tt + attn_dtype * b * heads * n * n + s * tt
    else:
        out += 3 * s * tt + s * tt + FP32 * b * heads * n  # qkv output, out, lse
    if cfg.attn_dropout > 0 and kernel == "math":
        out += (1 + attn_dtype) * b * heads * n * n
    # MLP, split by its width under TP
    out += 2 * s * b * n * m / tp  # GELU input, fc2 input
    if cfg.dropout > 0:
        out += b * n * m / tp + 2 * t / seq  # masks: after GELU, after proj and fc2
    return out


def stem_and_head_bytes(cfg, shape: Shape, prec: Precision, kernel: str, device: str = "cuda",
                        img_size: tuple[int, int] = (224, 224)) -> float:
    """Saved bytes outside the blocks: the image the patch convolution reads, the final norm,
    the pooling (a MAP head: its key / value projection over all tokens) and the head."""
    b, n, d = shape.batch, shape.tokens, shape.width
    s, r = prec.compute, prec.residual
    t = b * n * d
    out = s * b * cfg.in_chans * img_size[0] * img_size[1]
    if cfg.dropout > 0:
        out += t  # pos_drop's mask
    out += r * t + 8 * b * n  # final LayerNorm
    if cfg.pool == "token" and not prec.autocast:
        out += s * t  # the class token the head reads is a view of the whole norm output
    if cfg.pool == "map":
        attn_dtype = FP32 if kernel == "math" and device == "cpu" and s < FP32 else s
        out += s * t  # kv input
        out += 2 * (attn_dtype if kernel == "math" else s) * t  # k, v (copies under math)
        out += (attn_dtype if kernel == "math" else FP32) * b * cfg.heads * n  # probs / lse
    return out


def checkpointed(depth: int, every: int) -> list[bool]:
    """Which blocks activation checkpointing recomputes (parallel/checkpointing.py's rule)."""
    return [every > 0 and (i + 1) % every == 0 for i in range(depth)]


@dataclass(frozen=True)
class Activations:
    saved: float  # at the end of forward
    recompute: float  # one checkpointed block's activations rebuilt in backward
    backward: float = 0.0  # a block's gradient temporaries in backward

    @property
    def peak(self) -> float:
        return self.saved + self.recompute + self.backward


def backward_bytes(shape: Shape, prec: Precision, tp: int = 1, sp: bool = False) -> float:
    """The temporaries of one block's backward: the gradient of the MLP's hidden activation
    (M wide, split by tp) and two residual-stream gradients (the block's output and input)."""
    b, n = shape.batch, shape.tokens
    return prec.compute * b * n * shape.mlp / tp + 2 * prec.residual * b * n * shape.width / (
        tp if sp else 1)


def matmul_weights(cfg, tp: int = 1) -> tuple[int, int]:
    """(elements of one block's matmul / conv weights, of those outside the blocks), this TP
    rank's share: what bf16 autocast keeps a bf16 copy of for backward."""
    import re

    from vitscale.parallel.mesh import Layout
    from vitscale.plan.states import local_shape, meta_model

    _, params = meta_model(cfg)
    block = other = 0
    for p in params:
        if not p.name.endswith(".weight") or len(p.shape) < 2:
            continue
        numel = 1
        for size in local_shape(p, Layout(tp=tp), 0, 0):
            numel *= size
        if re.match(r"^blocks\.0\.", p.name):
            block += numel
        elif not p.name.startswith("blocks."):
            other += numel
    return block, other


def activation_bytes(cfg, batch: int, img_size: tuple[int, int], precision: str = "fp32",
                     param_dtype: str = "float32", kernel: str = "flash", every: int = 0,
                     tp: int = 1, sp: bool = False, device: str = "cuda") -> Activations:
    """Activations of a ViT (ModelConfig cfg) for `batch` images on one process. Under bf16
    autocast with fp32 parameters they include the bf16 weight copies autocast keeps for
    backward (the whole model's, gathered, once per forward: why FSDP runs want
    parallel.param_dtype=bfloat16)."""
    prec = Precision.of(precision, param_dtype)
    gh, gw = img_size[0] // cfg.patch[0], img_size[1] // cfg.patch[1]
    shape = Shape(batch, gh * gw + cfg.num_prefix_tokens, cfg.width, cfg.mlp_dim, cfg.heads)
    one = block_bytes(cfg, shape, prec, kernel, device, tp, sp)
    kept = prec.residual * shape.batch * shape.tokens * shape.width / (tp if sp else 1)
    flags = checkpointed(cfg.depth, every)
    saved = sum(kept if c else one for c in flags)
    saved += stem_and_head_bytes(cfg, shape, prec, kernel, device, img_size)
    if prec.autocast and prec.compute < prec.residual:  # bf16 copies of fp32 weights
        block_w, other_w = matmul_weights(cfg, tp)
        one += 2 * block_w  # cast again when a checkpointed block is recomputed
        saved += 2 * (other_w + block_w * flags.count(False))
    return Activations(saved=saved, recompute=one if any(flags) else 0.0,
                       backward=backward_bytes(shape, prec, tp, sp))
