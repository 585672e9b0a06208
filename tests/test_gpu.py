"""On a CUDA device: bf16 training, and parity of the model and the
As-ViT measures with the CPU. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitscale.config import load_config
from vitscale.models import create_model
from vitscale.train import run

pytestmark = pytest.mark.gpu

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# The demo recipe at test size; on the CPU, 200 steps reach 0.83 (fp32) and 0.82 (bf16 autocast).
TINY = ["model.name=Ti/2", "model.overrides.width=64", "model.overrides.depth=2",
        "model.overrides.heads=4", "model.overrides.mlp_dim=128", "data.img_size=16",
        "data.batch_size=64", "progress=false", "steps=200", "eval_every=200", "device=cuda"]


def test_bf16_training_on_cuda_follows_fp32(tmp_path):
    acc = {p: run(load_config(DEMO, [*TINY, f"precision={p}", f"out_dir={tmp_path / p}"]))
           .metrics["test/accuracy"] for p in ("fp32", "bf16")}
    assert acc["fp32"] > 0.7 and acc["bf16"] > 0.7, acc
    assert abs(acc["fp32"] - acc["bf16"]) < 0.05, acc


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
