"""`vitscale search`: REINFORCE over the As-ViT space, resumable, output a trainable config."""

from __future__ import annotations

import json
import math

import pytest

from vitscale.cli import main
from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.search.reinforce import (
    Policy,
    SearchSettings,
    normalised_change,
    ntk_batch,
    run_search,
)

TINY = dict(img_size=32, width=8, batch=4, repeats=1, n_theta=4)


def reference_kappa(arch: str, images, torch_seed: int, num_classes: int) -> float:
    """kappa by another code path: one autograd backward per image of sum(pooled pre-norm
    features) with respect to every parameter named "weight", the Gram matrix built explicitly,
    numpy's eigvalsh, lambda_max / lambda_min."""
    import numpy as np
    import torch

    from vitscale.models.asvit import AsViTConfig, create_asvit

    torch.manual_seed(torch_seed)
    model = create_asvit(AsViTConfig.from_arch(arch, num_classes=num_classes)).train()
    weights = [p for n, p in model.named_parameters() if "weight" in n]
    rows = []
    for x in images:
        grads = torch.autograd.grad(model.forward_prenorm_pooled(x[None]).sum(), weights,
                                    allow_unused=True)  # the final norm and head get none
        rows.append(np.concatenate([np.zeros(w.numel()) if g is None else g.double().numpy().ravel()
                                    for g, w in zip(grads, weights)]))
    g = np.stack(rows)
    eig = np.linalg.eigvalsh(g @ g.T)
    return float(eig[-1] / eig[0])


def test_policy_starts_uniform_with_the_papers_entropy():
    import torch

    policy = Policy(torch.Generator().manual_seed(0))
    # ln(5 * 3^3 * 3^2 * 2 * 5^4 * 3) = ln 4,556,250 = 15.33 nats, the paper's starting entropy.
    assert policy.entropy() == pytest.approx(math.log(4_556_250), abs=1e-4)


def test_normalised_change():
    assert normalised_change([5.0], 20) == 0.0
    assert normalised_change([1.0, 3.0, 2.0], 20) == pytest.approx(-1 / (2 + 1e-6))
    assert normalised_change([100.0, 1.0, 3.0, 2.0], 3) == pytest.approx(-1 / (2 + 1e-6))


def test_search_resumes_exactly_and_writes_a_trainable_topology(tmp_path):
    full = run_search(SearchSettings(steps=4, **TINY), tmp_path / "full", log=lambda _: None)
    run_search(SearchSettings(steps=2, **TINY), tmp_path / "split", log=lambda _: None)
    resumed = run_search(SearchSettings(steps=4, **TINY), tmp_path / "split", log=lambda _: None)
    strip = [{k: v for k, v in t.items() if k != "seconds"} for t in full.trajectory]
    assert [{k: v for k, v in t.items() if k != "seconds"} for t in resumed.trajectory] == strip
    assert resumed.topology == full.topology
    entropies = [t["entropy"] for t in full.trajectory]
    assert entropies[0] < math.log(4_556_250) + 1e-3 and len(set(entropies)) > 1
    # Step t measures with seed 100,003 * seed + t; its repeat r initialises with 1,000 * that + r.
    images = ntk_batch(SearchSettings(**TINY))
    for t in (strip[0], strip[3]):
        expected = reference_kappa(t["arch"], images, 1_000 * t["step"], num_classes=10)
        assert t["kappa"] == pytest.approx(expected, rel=1e-4)
    assert strip[0]["kappa"] != pytest.approx(strip[3]["kappa"], rel=1e-3)
    assert all(t["length"] > 0 for t in strip)
    assert (tmp_path / "full" / "search.png").read_bytes()[:4] == b"\x89PNG"
    cfg = load_config(tmp_path / "full" / "topology.yaml", ["data.img_size=32"])
    assert cfg.model.name == f"asvit:{full.topology.arch()}"
    assert cfg.model.build_config(10, 32).kernels == full.topology.kernels
    with pytest.raises(ConfigError, match="other settings .*width"):
        run_search(SearchSettings(steps=5, **{**TINY, "width": 16}), tmp_path / "full")


def test_search_cli_and_random_baseline(tmp_path, capsys):
    args = ["--img-size", "32", "--width", "8", "--batch", "4", "--repeats", "1", "--n-theta", "4"]
    assert main(["search", "--out", str(tmp_path), "--steps", "1", *args]) == 0
    assert "searched topology:" in capsys.readouterr().out
    assert main(["search", "--out", str(tmp_path), "--random", "2", *args]) == 0
    rows = json.loads((tmp_path / "random.json").read_text())
    assert len(rows) == 2 and (tmp_path / "random_topology.yaml").is_file()
    assert main(["search", "--out", str(tmp_path), "--img-size", "30"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_corrupt_search_state_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "search.json").write_text('{"settings": {"lr": 0.08')  # cut short by a full disk
    args = ["--img-size", "32", "--width", "8", "--batch", "4", "--repeats", "1", "--n-theta", "4"]
    assert main(["search", "--out", str(tmp_path), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "search.json is not valid JSON" in err and "search afresh" in err


def test_plots_leave_the_global_backend_alone(tmp_path):
    """The three PNG writers draw on their own Agg canvas: a notebook's backend survives."""
    import matplotlib

    from vitscale.eval.classify import reliability_diagram
    from vitscale.search.autoscale import plot_trajectory
    from vitscale.search.reinforce import plot_search

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend that cannot write PNGs: drawing must not go through it
    try:
        trajectory = [{"step": s, "entropy": 15.0 - s, "reward": 0.1 * s, "baseline": 0.0,
                       "kappa": 100.0 + s, "length": 5.0} for s in range(3)]
        rows = [{"depths": [1, 1, 1, d], "width": w} for d, w in ((1, 32), (2, 40))]
        bins = [{"lo": 0.0, "hi": 0.5, "accuracy": 0.4, "confidence": 0.3, "count": 3},
                {"lo": 0.5, "hi": 1.0, "accuracy": 0.8, "confidence": 0.9, "count": 7}]
        paths = [plot_search(trajectory, tmp_path / "search.png"),
                 plot_trajectory(rows, tmp_path / "scale.png", {"30M": rows[1]}),
                 reliability_diagram(bins, tmp_path / "reliability.png")]
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
