"""Training checkpoints: atomic writes, pruning, exact restore, refusal of non-finite weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vitscale.errors import CheckpointError
from vitscale.models import create_model
from vitscale.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_newest_loadable,
    save_checkpoint,
)
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
    # The error names the first tensors that differ, with both shapes.
    with pytest.raises(CheckpointError, match=r"does not fit this model \(missing "
                       r"blocks\.1\.norm1\.weight.*\)") as exc:
        load_checkpoint(latest_checkpoint(tmp_path), other)
    assert "\n" not in str(exc.value)
    wider = create_model("Ti/16", img_size=16, patch=8, depth=1, width=32, heads=2, mlp_dim=96,
                         num_classes=3)
    with pytest.raises(CheckpointError, match=r"shapes differ: blocks\.0\.mlp\.fc1\.weight "
                       r"\(64, 32\) vs model \(96, 32\)"):
        load_checkpoint(latest_checkpoint(tmp_path), wider)
    (tmp_path / "checkpoints" / "latest").write_text("step-000000099\n")
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize("decay, n, kept", [
    (0.999, 5, 1 / math.comb(14, 9)),  # prod_{t<n} (1+t)/(10+t) = 1 / C(n+9, 9)
    (0.5, 20, 0.5 ** 12 / math.comb(17, 9)),  # capped at 0.5 from t = 8 on
])
def test_ema_warmup_keeps_the_closed_form_share_of_the_initial_weights(decay, n, kept):
    start, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p, q in zip(start.parameters(), target.parameters()):
            p.zero_()
            q.fill_(1.0)
    ema = EMA(start, decay)
    for step in range(n):
        ema.update(target, step)
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1 - kept), rtol=0, atol=1e-6)
    constant = EMA(start, decay)
    constant.update(target)  # no step: the plain decay
    torch.testing.assert_close(next(constant.module.parameters()),
                               torch.full((2, 3), 1 - decay), rtol=0, atol=1e-7)


def _three_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    states = {}
    for step in (1, 2, 3):
        train_steps(model, opt, 1)
        save_checkpoint(tmp_path, step, model, opt, {}, keep=3)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


@pytest.mark.parametrize("damage", ["truncate", "flip", "optimizer", "state"])
def test_unreadable_latest_falls_back_to_the_newest_that_loads(tmp_path, damage):
    states = _three_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    newest = root / "step-000000003"
    target = {"truncate": "model.safetensors", "flip": "model.safetensors",
              "optimizer": "optimizer.safetensors", "state": "state.json"}[damage]
    data = bytearray((newest / target).read_bytes())
    if damage == "flip":  # one bit inside the tensor data: only the checksum can tell
        data[-5] ^= 0x01
    else:
        data = data[: len(data) // 2]
    (newest / target).write_bytes(bytes(data))
    warnings = []
    files = read_newest_loadable(tmp_path, warnings.append)
    assert files.path.name == "step-000000002" and files.doc["step"] == 2
    assert len(warnings) == 1 and target in warnings[0] and "step-000000003" in warnings[0]
    # The bad folder is kept (renamed, never pruned) and `latest` names the one that loads.
    assert (root / "unreadable-step-000000003" / target).read_bytes() == bytes(data)
    assert latest_checkpoint(tmp_path).name == "step-000000002"
    model = tiny()
    load_checkpoint(files.path, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in states[2].items())


def test_no_readable_checkpoint_is_one_line_and_deletes_nothing(tmp_path):
    _three_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-00000000{step}" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read") as exc:
        read_newest_loadable(tmp_path, lambda m: None)
    assert "\n" not in str(exc.value)
    assert len([p for p in root.iterdir() if p.is_dir()]) == 3


def test_crash_while_replacing_a_step_folder_keeps_a_resumable_checkpoint(tmp_path, monkeypatch):
    # Re-saving an existing step (after --resume from an older one) moves the old folder aside
    # before the new one is renamed in; a crash between the two renames must not leave `latest`
    # naming nothing.
    import vitscale.train.checkpoint as ckpt

    states = _three_checkpoints(tmp_path)
    model = tiny()
    model.load_state_dict(states[1])
    real = ckpt.os.replace

    def crash_on_moving_the_new_folder_in(src, dst):
        if Path(src).name.startswith(".tmp-step-"):  # the old folder is already aside
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_moving_the_new_folder_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, keep=3)
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not (tmp_path / "checkpoints" / "step-000000003").exists()  # the crash window
    warnings = []
    files = read_newest_loadable(tmp_path, warnings.append)
    assert files.doc["step"] == 3 and files.path.name.startswith(".old-step-000000003")
    assert all(torch.equal(files.weights[k], v) for k, v in states[3].items())
