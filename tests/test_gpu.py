"""On a CUDA device: bf16 training, and parity of the model and the
As-ViT measures with the CPU. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from vitscale.config import load_config
from vitscale.models import create_model
from vitscale.train import run

pytestmark = pytest.mark.gpu

TINY = ["model.name=Ti/4", "model.overrides.width=64", "model.overrides.depth=2",
        "model.overrides.heads=4", "model.overrides.mlp_dim=128", "data.img_size=16",
        "data.batch_size=32", "progress=false", "device=cuda"]


def test_bf16_training_on_cuda(tmp_path):
    result = run(load_config(None, [*TINY, "precision=bf16", "steps=100", "optim.lr=0.002",
                                    "data.augment=none", f"out_dir={tmp_path}"]))
    assert result.metrics["test/accuracy"] > 0.3


def test_vit_forward_matches_cpu():
    torch.manual_seed(0)
    model = create_model("S/16", img_size=64, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_asvit_measures_match_cpu():
    from vitscale.models.asvit import AsViTConfig, create_asvit
    from vitscale.search.complexity import ntk_gram

    cfg = AsViTConfig.from_arch("5,2,2|3,1,3|2,1,2|3,1,4|8,8", num_classes=4)
    torch.manual_seed(0)
    model = create_asvit(cfg).double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cpu = ntk_gram(model, images)
    gpu = ntk_gram(model.cuda(), images.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-8, atol=1e-10)
