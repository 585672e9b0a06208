"""The `vitscale` command line: tables, conversions and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitscale.cli import main
from vitscale.models import load


def test_models_table(capsys):
    assert main(["models", "Ti/16", "B/16", "22B/14"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if "/" in line[:7]}
    assert lines["B/16"][-2:] == ["86.57", "35.13"]  # params (M), GFLOPs at 224 px
    assert lines["22B/14"][5:7] == ["map", "parallel"]


def test_models_json_and_every_default_name(capsys):
    assert main(["models", "--json", "--patch", "16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:3] == ["Ti/16", "S/16", "M/16"]
    assert all(r["seq_len"] in (196, 197) for r in rows)


def test_convert_timm_to_vitscale_and_back(tmp_path, capsys):
    theirs = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                     num_classes=10).eval()
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    assert main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "ours"),
                 "--set", "heads=4"]) == 0
    assert "wrote vitscale checkpoint" in capsys.readouterr().out
    model = load(tmp_path / "ours")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pth"),
                 "--img-size", "48"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back["pos_embed"].shape == (1, 37, 64)


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitscale.cli", "convert", str(tmp_path / "missing.npz"),
         str(tmp_path / "out")], capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vitscale.cli", "models", "Q/16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model name 'Q/16'" in proc.stderr


def test_bad_override_syntax(capsys):
    assert main(["convert", "a", "b", "--set", "heads"]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_convert_set_values_are_typed_and_bad_ones_are_one_line(tmp_path, capsys):
    theirs = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=3)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    # YAML reads 1e-5 as a string: it must reach the model as a float, not crash it later.
    assert main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "ours"),
                 "--set", "heads=4", "norm_eps=1e-5"]) == 0
    assert load(tmp_path / "ours").cfg.norm_eps == 1e-5
    capsys.readouterr()
    for setting, message in (("x=[1", "--set x: not a setting of a model"),
                             ("heads=[1", "--set heads: expected an integer, got '[1'"),
                             ("norm_eps=small", "--set norm_eps: expected a number")):
        assert main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "bad"),
                     "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad").exists()
