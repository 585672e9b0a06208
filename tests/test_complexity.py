"""As-ViT complexity measures against slow references: finite differences for L^E, explicit
per-sample gradients for the NTK condition number."""

from __future__ import annotations

import math

import pytest
import torch

from vitscale.models.asvit import AsViTConfig, create_asvit
from vitscale.search.complexity import (
    circle,
    condition_number,
    curve_length,
    ntk_condition_number,
    without_layernorm,
)

ARCH = "5,2,2|3,1,3|2,1,2|3,1,4|8,8"  # C = 8, heads 1/2/4/8


def build():
    return create_asvit(AsViTConfig.from_arch(ARCH, num_classes=4))


def test_curve_length_equals_finite_differences():
    img, n_theta = 16, 6
    ours = curve_length(build, img, n_theta=n_theta, repeats=2, seed=3, dtype=torch.float64)
    eps = 1e-5
    lengths = []
    for rep in range(2):
        torch.manual_seed(3 * 1_000 + rep)
        model = without_layernorm(build()).double()
        assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
        gen = torch.Generator().manual_seed(3 * 1_000 + rep)
        points, tangents = circle(3 * img * img, n_theta, gen, math.sqrt(3 * img * img))
        total = 0.0
        with torch.no_grad():
            for h, t in zip(points, tangents):
                # h(theta +- eps) on the circle: a rotation by eps in the (h, h') plane.
                plus = math.cos(eps) * h + math.sin(eps) * t
                minus = math.cos(eps) * h - math.sin(eps) * t
                f = model.forward_prenorm_pooled
                diff = f(plus.reshape(1, 3, img, img)) - f(minus.reshape(1, 3, img, img))
                total += float((diff / (2 * eps)).norm())
        lengths.append(total)
    assert ours == pytest.approx(sum(lengths) / 2, rel=1e-6)


def test_ntk_condition_number_equals_per_sample_gradients():
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = ntk_condition_number(build, images, repeats=2, seed=1)
    kappas = []
    for rep in range(2):
        torch.manual_seed(1 * 1_000 + rep)
        model = build().train()
        weights = [p for n, p in model.named_parameters() if "weight" in n]
        rows = []
        for x in images:
            model.zero_grad()
            model.forward_prenorm_pooled(x[None]).sum().backward()
            # Parameters the features do not reach (final norm, head) have no gradient.
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                   .reshape(-1).double() for p in weights]))
        g = torch.stack(rows)
        eig = torch.linalg.eigvalsh(g @ g.T)
        kappas.append(float(eig[-1] / eig[0]))
    assert ours == pytest.approx(sum(kappas) / 2, rel=1e-5)


def test_deterministic_and_guarded():
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert curve_length(build, 16, repeats=1) == curve_length(build, 16, repeats=1)
    assert ntk_condition_number(build, images, repeats=1) == ntk_condition_number(build, images,
                                                                                   repeats=1)
    assert curve_length(build, 16, repeats=1, seed=1) != curve_length(build, 16, repeats=1)
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert condition_number(singular) == math.inf
    assert condition_number(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])) == math.inf
    assert condition_number(torch.diag(torch.tensor([2.0, 8.0]))) == pytest.approx(4.0)
