"""Transformer building blocks. Module and parameter names follow timm so state dicts match."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(dim: int, eps: float, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def activation(name: str) -> nn.Module:
    # Flax's default GELU is the tanh approximation; timm's is exact.
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, optional QK LayerNorm."""

    def __init__(
        self,
        dim: int,
        heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # ViT-22B: LayerNorm on per-head queries and keys keeps attention logits bounded.
        self.q_norm = layer_norm(self.head_dim, norm_eps, norm_bias) if qk_norm else nn.Identity()
        self.k_norm = layer_norm(self.head_dim, norm_eps, norm_bias) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # A list while vitscale.analysis.record_attention is on: the explicit softmax(QK^T) path
        # runs and appends its probabilities; None (training, inference) keeps the fused kernel.
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # -1, not self.heads / c: a tensor-parallel rank holds heads / tp of the heads
        # (parallel/tp.py), and the reshape is the same either way.
        qkv = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop if self.training else 0.0
        if self.recorded is None:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
            self.recorded.append(attn.detach())
            x = F.dropout(attn, drop) @ v
        x = x.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention probabilities (B, heads, N, N), for analysis; no dropout."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)


# PyTorch's fused inference kernel for a pre-LN encoder layer (nn.TransformerEncoderLayer's
# fast path): the same math as Block in one native call, ~5% faster on CPU but 0.6% slower than
# the module path on an H100 in fp32 (docs/benchmarks.md), so CPU only. Private API, so it is
# only used when present and falls back to the module path otherwise.
_FUSED_LAYER = getattr(torch, "_transformer_encoder_layer_fwd", None)


class Block(nn.Module):
    """Pre-LN encoder block (ViT): x + Attn(LN(x)), then + MLP(LN(x))."""

    def __init__(self, cfg, drop_path: float) -> None:
        super().__init__()
        self.norm1 = layer_norm(cfg.width, cfg.norm_eps, cfg.norm_bias)
        self.attn = _attention(cfg)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = layer_norm(cfg.width, cfg.norm_eps, cfg.norm_bias)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.act, cfg.mlp_bias, cfg.dropout)
        self.drop_path2 = drop_path_or_identity(drop_path)
        # The fused kernel knows exact GELU, biases everywhere and no QK-norm only.
        self.fusable = (_FUSED_LAYER is not None and cfg.act == "gelu" and not cfg.qk_norm
                        and cfg.qkv_bias and cfg.proj_bias and cfg.mlp_bias and cfg.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable and not self.window and not self.training and not torch.is_grad_enabled() \
                and x.is_cpu and not torch.is_autocast_enabled() and x.dtype == self.norm1.weight.dtype \
                and self.attn.recorded is None:
            return self._fused_forward(x)
        x = x + self.drop_path1(attend(self, self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, m = self.attn, self.mlp
        return _FUSED_LAYER(
            x, a.qkv.in_features, a.heads, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
            True, True, self.norm1.eps,  # exact GELU, pre-LN
            self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
            m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, None, None,
        )


class ParallelBlock(nn.Module):
    """ViT-22B block: y = x + Attn(LN(x)) + MLP(LN(x)) with one shared LayerNorm."""

    def __init__(self, cfg, drop_path: float) -> None:
        super().__init__()
        self.norm1 = layer_norm(cfg.width, cfg.norm_eps, cfg.norm_bias)
        self.attn = _attention(cfg)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.act, cfg.mlp_bias, cfg.dropout)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        return x + self.drop_path(attend(self, y) + self.mlp(y))


# Window attention (ViTDet): the model sets `window` (0: global), `grid` (the patch grid of the
# current input) and `num_prefix` on each block; the attention module itself is unchanged.
def attend(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block.attn on x, globally or inside block.window x block.window windows of the grid."""
    window = getattr(block, "window", 0)
    if not window:
        return block.attn(x)
    return window_attention(block.attn, x, block.grid, window, block.num_prefix)


def window_attention(attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int,
                     num_prefix: int = 0) -> torch.Tensor:
    """`attn` applied to each window x window window of the (gh, gw) token grid separately.

    x is (B, prefix + gh * gw, D). The grid is zero-padded at the bottom / right to multiples of
    the window (as ViTDet does; padded tokens are dropped again afterwards) and the windows
    become the batch; the prefix tokens (class / distillation) attend among themselves only.
    """
    b, _, d = x.shape
    gh, gw = grid
    prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
    ph, pw = (-gh) % window, (-gw) % window
    tokens = tokens.reshape(b, gh, gw, d)
    if ph or pw:
        tokens = F.pad(tokens, (0, 0, 0, pw, 0, ph))
    nh, nw = (gh + ph) // window, (gw + pw) // window
    wins = tokens.reshape(b, nh, window, nw, window, d).permute(0, 1, 3, 2, 4, 5)
    out = attn(wins.reshape(b * nh * nw, window * window, d))
    out = out.reshape(b, nh, nw, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, nh * window, nw * window, -1)[:, :gh, :gw].reshape(b, gh * gw, -1)
    if num_prefix:
        out = torch.cat([attn(prefix), out], dim=1)
    return out


def _attention(cfg) -> Attention:
    return Attention(
        cfg.width,
        cfg.heads,
        qkv_bias=cfg.qkv_bias,
        proj_bias=cfg.proj_bias,
        qk_norm=cfg.qk_norm,
        norm_eps=cfg.norm_eps,
        norm_bias=cfg.norm_bias,
        attn_drop=cfg.attn_dropout,
        proj_drop=cfg.dropout,
    )


class MAPHead(nn.Module):
    """Multihead attention pooling (Scaling ViT / big_vision MAPHead).

    A learned probe cross-attends over all tokens (no residual from the probe), then a residual
    MLP on LN of the result. Names follow timm's AttentionPoolLatent.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        dim = cfg.width
        self.heads = cfg.heads
        self.head_dim = dim // cfg.heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=cfg.proj_bias)
        self.norm = layer_norm(dim, cfg.norm_eps, cfg.norm_bias)
        self.mlp = Mlp(dim, cfg.map_mlp_dim or cfg.mlp_dim, cfg.act, cfg.mlp_bias)
        nn.init.xavier_uniform_(self.latent.view(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # Project the probe per sample (not once) so FLOPs per image do not depend on the batch.
        q = self.q(self.latent.expand(b, -1, -1))
        # -1 for the head count and the width, as in Attention.forward (tensor parallelism).
        q = q.reshape(b, 1, -1, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, -1)
        o = self.proj(o)
        o = o + self.mlp(self.norm(o))
        return o[:, 0]
