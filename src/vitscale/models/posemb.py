"""Position embeddings (fixed 2-D sin-cos, resampling a learned grid to a new grid) and
resampling the patch-embedding kernel to a new patch size (FlexiViT's PI-resize)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitscale.errors import CheckpointError


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0,
              ref_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MoCo v3 / big_vision), shape (gh * gw, width).

    With K = width / 4 and omega_k = temperature ** -(k / (K - 1)), the patch at (row y, col x)
    gets [sin(x omega), cos(x omega), sin(y omega), cos(y omega)]; rows are flattened row-major.
    `ref_grid` (rh, rw): measure positions in that grid's units instead, so the patch centres of
    `grid` sit where they fall on the reference grid over the same image, x -> (x + 1/2) rw / gw
    - 1/2 (what resampling does to a learned table); None or `grid` itself gives big_vision's
    integer positions.
    """
    if width % 4:
        raise ValueError(f"sincos_2d needs width divisible by 4, got {width}")
    gh, gw = grid
    rh, rw = ref_grid or grid
    quarter = width // 4
    # big_vision divides by (K - 1) so that omega spans exactly [1, 1/temperature].
    k = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**k

    def positions(n: int, ref: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        return i if n == ref else (i + 0.5) * (ref / n) - 0.5

    y, x = torch.meshgrid(positions(gh, rh), positions(gw, rw), indexing="ij")
    ax = x.reshape(-1, 1) * omega
    ay = y.reshape(-1, 1) * omega
    emb = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    return emb.to(torch.float32)


def resample_grid(
    posemb: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
    align_corners: bool = False,
) -> torch.Tensor:
    """Resample a (1, prefix + gh * gw, D) position embedding to `new_grid`.

    The prefix rows (class token) are kept as they are; only the 2-D grid is interpolated.
    `old_grid` defaults to a square grid. mode='bicubic', antialias=True is timm's default for
    PyTorch checkpoints; mode='bilinear', align_corners=True reproduces big_vision's
    scipy.ndimage.zoom(order=1).
    """
    if posemb.ndim == 2:
        posemb = posemb.unsqueeze(0)
    n = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(
                f"position embedding has {n} grid rows, which is not a square grid; pass the old "
                "grid size (h, w) explicitly"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise CheckpointError(
            f"position embedding has {n} grid rows but old grid {old_grid} needs "
            f"{old_grid[0] * old_grid[1]}"
        )
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    kwargs = {"align_corners": align_corners} if mode in ("bilinear", "bicubic") else {}
    grid = F.interpolate(grid, size=new_grid, mode=mode, antialias=antialias, **kwargs)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_patch_kernel(weight: torch.Tensor, new_size: tuple[int, int], mode: str = "bicubic",
                          antialias: bool = True) -> torch.Tensor:
    """A (D, C, h, w) patch-embedding kernel for (H, W) patches, by FlexiViT's pseudo-inverse
    resize: with B the matrix that resizes an h x w patch to H x W (`mode`, `antialias`), the new
    kernel is pinv(B^T) w, so that <B x, w_new> = <x, w> whenever B has full column rank
    (upsampling): a patch resized to the new size gives the token it gave before."""
    h, w = weight.shape[-2:]
    if (h, w) == tuple(new_size):
        return weight
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    smooth = mode in ("bilinear", "bicubic")  # the modes that take antialias / align_corners
    resized = F.interpolate(basis, size=tuple(new_size), mode=mode, antialias=antialias and smooth,
                            align_corners=False if smooth else None)
    b = resized.reshape(h * w, -1).T  # (H W, h w): column j = resized basis patch j
    pinv = torch.linalg.pinv(b.T)  # (H W, h w)
    flat = weight.double().reshape(-1, h * w)  # (D C, h w)
    return (flat @ pinv.T).reshape(*weight.shape[:2], *new_size).to(weight.dtype)
