"""Training checkpoints: atomic writes, pruning, exact restore, refusal of non-finite weights."""

from __future__ import annotations

import pytest
import torch

from vitscale.errors import CheckpointError
from vitscale.models import create_model
from vitscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitscale.train.ema import EMA


def tiny():
    return create_model("Ti/16", img_size=16, patch=8, depth=1, width=32, heads=2, mlp_dim=64,
                        num_classes=3)


def train_steps(model, opt, n, ema=None):
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(4, 3, 16, 16)
        torch.nn.functional.dropout(x, 0.5).sum()  # consume global RNG like dropout does
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        if ema:
            ema.update(model)


def test_round_trip_restores_everything_exactly(tmp_path):
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9)
    train_steps(model, opt, 3, ema)
    save_checkpoint(tmp_path, 3, model, opt, {"epoch": 1}, ema=ema.module)
    train_steps(model, opt, 2, ema)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_ema = {k: v.clone() for k, v in ema.module.state_dict().items()}

    torch.manual_seed(123)  # garbage RNG state: the checkpoint must restore it
    model2 = tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = EMA(model2, 0.9)
    doc = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, ema2.module)
    assert doc["step"] == 3 and doc["epoch"] == 1
    train_steps(model2, opt2, 2, ema2)
    for k, v in expected.items():
        assert torch.equal(model2.state_dict()[k], v), k
    for k, v in expected_ema.items():
        assert torch.equal(ema2.module.state_dict()[k], v), k


def test_keep_last_n_and_latest_pointer(tmp_path):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000000009-1").mkdir()  # left by a crash
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000000003", "step-000000004"]
    assert latest_checkpoint(tmp_path).name == "step-000000004"


def test_non_finite_weights_are_never_written(tmp_path):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save_checkpoint(tmp_path, 5, model, opt, {})
    assert latest_checkpoint(tmp_path) is None


def test_incomplete_latest_and_mismatched_model(tmp_path):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 1, model, opt, {})
    other = create_model("Ti/16", img_size=16, patch=8, depth=2, width=32, heads=2, mlp_dim=64,
                         num_classes=3)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(latest_checkpoint(tmp_path), other)
    (tmp_path / "checkpoints" / "latest").write_text("step-000000099\n")
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_checkpoint(tmp_path)
