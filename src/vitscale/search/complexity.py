"""As-ViT's two measures of a network at initialization (shared/research/asvit*.md, §1-2).

L^E, the length of the output curve: a great circle h(theta) = r (u0 cos theta + u1 sin theta)
in input space (u0, u1 orthonormal in R^N, N = C*H*W; r = sqrt(N) as the paper, or 1 as the
public code) goes through the network with every LayerNorm replaced by identity; L^E is the sum
over the theta samples of ||d f(h(theta)) / d theta||_2, f the pooled pre-norm features, averaged
over `repeats` fresh initialisations and circles. The derivative is one forward-mode JVP along
dh/dtheta = r (-u0 sin theta + u1 cos theta), batched over theta (torch.func.jvp).

kappa, the NTK condition number: per-sample gradients g_i of sum(f(x_i)) with respect to the
parameters (by default those named "weight", as the public code), Theta = G G^T in float64,
kappa = lambda_max / lambda_min from a symmetric eigensolver (torch.func.vmap over grad); a
lambda_min that is not clearly positive gives kappa = inf. Averaged over `repeats` fresh
initialisations on one fixed, un-augmented batch. Lower kappa: easier to train; higher L^E:
more expressive.

`build` is a callable returning a freshly initialised model with `forward_prenorm_pooled`
(vitscale.models.asvit.AsViT); each repeat seeds torch before calling it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

# Forward-mode AD and vmap need the math attention kernel on CPU (no JVP rule for flash).
_MATH = SDPBackend.MATH


def without_layernorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.LayerNorm replaced by identity (L^E's network)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, child_name, nn.Identity())
    return model


def _features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(model, "forward_prenorm_pooled", None)
    if fn is None:
        raise TypeError(f"{type(model).__name__} has no forward_prenorm_pooled(x)")
    return fn


def circle(n_pixels: int, n_theta: int, gen: torch.Generator, radius: float,
           include_endpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, tangents), each (n_theta, n_pixels): h(theta) and dh/dtheta on a random
    great circle of the given radius."""
    u, _ = torch.linalg.qr(torch.randn(n_pixels, 2, generator=gen, dtype=torch.float64))
    stop = 2 * math.pi
    theta = (torch.linspace(0, stop, n_theta, dtype=torch.float64) if include_endpoint
             else torch.arange(n_theta, dtype=torch.float64) * (stop / n_theta))
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    points = radius * (cos * u[:, 0] + sin * u[:, 1])
    tangents = radius * (-sin * u[:, 0] + cos * u[:, 1])
    return points, tangents


def init_seed(seed: int, rep: int) -> int:
    """The torch seed of repeat `rep` of a measure called with `seed`."""
    return seed * 1_000 + rep


def curve_speeds(build: Callable[[], nn.Module], img_size: int | tuple[int, int],
                 in_chans: int = 3, n_theta: int = 10, seed: int = 0, radius: str = "paper",
                 include_endpoint: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """||d f(h(theta)) / d theta|| at each of the `n_theta` points (float64), for the one
    initialisation and circle drawn from `seed`; L^E of that initialisation is their sum."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    n = in_chans * h * w
    if radius not in ("paper", "code"):
        raise ValueError(f"radius must be 'paper' (sqrt(N)) or 'code' (1), got {radius!r}")
    r = math.sqrt(n) if radius == "paper" else 1.0
    torch.manual_seed(seed)
    model = without_layernorm(build()).to(dtype).train()
    points, tangents = circle(n, n_theta, torch.Generator().manual_seed(seed), r, include_endpoint)
    shape = (n_theta, in_chans, h, w)
    with sdpa_kernel(_MATH):
        _, velocity = jvp(_features(model), (points.to(dtype).reshape(shape),),
                          (tangents.to(dtype).reshape(shape),))
    return velocity.detach().double().norm(dim=1)


def curve_length(build: Callable[[], nn.Module], img_size: int | tuple[int, int],
                 in_chans: int = 3, n_theta: int = 10, repeats: int = 3, seed: int = 0,
                 radius: str = "paper", include_endpoint: bool = False,
                 dtype: torch.dtype = torch.float32) -> float:
    """L^E of the architecture `build()` makes (mean over `repeats`)."""
    lengths = [float(curve_speeds(build, img_size, in_chans, n_theta, init_seed(seed, rep), radius,
                                  include_endpoint, dtype).sum()) for rep in range(repeats)]
    return sum(lengths) / len(lengths)


def _weights(model: nn.Module, only_weights: bool) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()
            if p.requires_grad and (not only_weights or "weight" in name)}


class _Pooled(nn.Module):
    """forward = the wrapped model's forward_prenorm_pooled, for torch.func.functional_call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        _features(model)  # fail early with a clear message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_prenorm_pooled(x)


def ntk_gram(model: nn.Module, images: torch.Tensor, only_weights: bool = True) -> torch.Tensor:
    """Theta = G G^T (B x B, float64), G the per-sample gradients of sum(features)."""
    wrapper = _Pooled(model)
    params = {f"model.{name}": p for name, p in _weights(model, only_weights).items()}

    def scalar(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, p, (x[None],)).sum()

    with sdpa_kernel(_MATH):
        grads = vmap(grad(scalar), in_dims=(None, 0), randomness="same")(params, images)
    b = images.shape[0]
    g = torch.cat([v.detach().reshape(b, -1).double() for v in grads.values()], dim=1)
    return g @ g.T


def condition_number(gram: torch.Tensor, rel_eps: float = 1e-12) -> float:
    """lambda_max / lambda_min of a symmetric PSD matrix; inf when lambda_min <= rel_eps *
    lambda_max (round-off can make it zero or negative) or the matrix is not finite."""
    if not torch.isfinite(gram).all():
        return math.inf
    eig = torch.linalg.eigvalsh(gram.double())
    lo, hi = float(eig[0]), float(eig[-1])
    if hi <= 0 or lo <= rel_eps * hi:
        return math.inf
    return hi / lo


def ntk_condition_number(build: Callable[[], nn.Module], images: torch.Tensor,
                         repeats: int = 3, seed: int = 0, only_weights: bool = True) -> float:
    """kappa of the architecture `build()` makes on `images` (mean over `repeats`)."""
    kappas = [condition_number(init_gram(build, images, init_seed(seed, rep), only_weights))
              for rep in range(repeats)]
    return sum(kappas) / len(kappas)


def init_gram(build: Callable[[], nn.Module], images: torch.Tensor, seed: int,
              only_weights: bool = True) -> torch.Tensor:
    """The NTK Gram matrix of the one initialisation drawn from `seed` (train mode). Its
    leading b x b block is the Gram matrix of the first b images."""
    torch.manual_seed(seed)
    return ntk_gram(build().train(), images, only_weights)
