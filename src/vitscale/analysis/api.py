"""`vitscale analyze`: each analysis on a loaded model, its PNG and the JSON of its numbers."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitscale.analysis.attention import attention_distance, attention_rollout, is_asvit
from vitscale.analysis.attribution import integrated_gradients
from vitscale.analysis.embeddings import filter_components, patch_kernels, posemb_similarity, position_table
from vitscale.analysis.robustness import robustness
from vitscale.errors import ConfigError, UserError
from vitscale.utils.io import atomic_write_text
from vitscale.utils.plot import figure, save_png

ANALYSES = ("filters", "posemb", "distance", "rollout", "ig", "robustness")


def parse_what(text: str | Sequence[str] | None) -> list[str] | None:
    """'filters,distance' -> ['filters', 'distance']; None / 'all' -> None (every analysis that
    applies to the model)."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names == ["all"]:
        return None
    bad = [n for n in names if n not in ANALYSES]
    if bad or not names:
        raise ConfigError(f"--what {','.join(bad) or text!r}: unknown analysis; choose from "
                          f"{','.join(ANALYSES)} (comma-separated) or all")
    return list(dict.fromkeys(names))


def _images01(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def _hwc(img: torch.Tensor):
    img = img.detach().float()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0).numpy()


def _mosaic(tiles: torch.Tensor, cols: int, pad: int = 1, fill: float = 1.0) -> torch.Tensor:
    """(K, C, h, w) tiles -> one (C, H, W) image, `cols` tiles a row, `pad` pixels between."""
    k, c, h, w = tiles.shape
    rows = -(-k // cols)
    out = torch.full((c, rows * (h + pad) - pad, cols * (w + pad) - pad), fill, dtype=tiles.dtype)
    for i in range(k):
        r, q = divmod(i, cols)
        out[:, r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = tiles[i]
    return out


# ---------------------------------------------------------------------------------- analyses
def run_filters(model, out: Path, k: int = 28) -> dict:
    res = filter_components(patch_kernels(model), k)
    comps = res["components"].float()
    lo = comps.flatten(1).min(dim=1).values[:, None, None, None]
    hi = comps.flatten(1).max(dim=1).values[:, None, None, None]
    tiles = (comps - lo) / (hi - lo).clamp_min(1e-12)
    fig = figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(_hwc(_mosaic(tiles, 7)), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"RGB embedding filters: top {len(tiles)} principal components "
                 f"({float(res['explained'].sum()):.0%} of the variance)", fontsize=9)
    save_png(fig, out / "filters.png")
    return {"explained": res["explained"].tolist(), "singular_values": res["singular_values"].tolist(),
            "kernel": list(comps.shape[1:]), "components": comps.tolist()}


def run_posemb(model, out: Path) -> dict:
    table, (gh, gw), kind = position_table(model)
    sim = posemb_similarity(table)  # (N, N)
    tiles = sim.float().reshape(gh * gw, 1, gh, gw)
    fig = figure(figsize=(6, 5.4))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(_mosaic(tiles, gw, fill=float("nan"))[0].numpy(), cmap="viridis",
                   vmin=float(sim.min()), vmax=1, interpolation="nearest")
    ax.set_xticks([(j + 0.5) * (gw + 1) - 1 for j in range(gw)], [str(j + 1) for j in range(gw)],
                  fontsize=6)
    ax.set_yticks([(i + 0.5) * (gh + 1) - 1 for i in range(gh)], [str(i + 1) for i in range(gh)],
                  fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"Position embedding similarity ({kind})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    save_png(fig, out / "posemb.png")
    return {"kind": kind, "grid": [gh, gw], "similarity": sim.tolist()}


def run_distance(model, images: torch.Tensor, out: Path) -> dict:
    res = attention_distance(model, images)
    fig = figure(figsize=(5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for layer, heads in enumerate(res["distance"]):
        ax.scatter([layer + 1] * len(heads), heads, s=14, color="C0", alpha=0.7)
    ax.plot(range(1, len(res["layer_mean"]) + 1), res["layer_mean"], color="C1", label="layer mean")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, None)
    rho = res["spearman"]
    ax.set_title(f"{len(images)} images at {images.shape[-1]} px"
                 + (f": Spearman {rho:.2f} with depth" if rho is not None else ""), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, out / "distance.png")
    return res


def _overlay(fig, images: torch.Tensor, maps: torch.Tensor, title: str, labels: list[str]) -> None:
    import torch.nn.functional as F

    n = len(images)
    up = F.interpolate(maps[:, None].float(), size=images.shape[-2:], mode="bilinear",
                       align_corners=False)[:, 0]
    lo, hi = up.flatten(1).min(1).values, up.flatten(1).max(1).values
    up = (up - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]
    for i in range(n):
        for row, show_map in ((0, False), (1, True)):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(_hwc(_images01(images[i])), interpolation="nearest")
            if show_map:
                ax.imshow(up[i].numpy(), cmap="jet", alpha=0.5, interpolation="bilinear")
            else:
                ax.set_title(labels[i], fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)


def run_rollout(model, images: torch.Tensor, out: Path, variant: str = "auto") -> dict:
    res = attention_rollout(model, images, variant)
    pred = res["logits"].argmax(-1)
    fig = figure(figsize=(1.2 * len(images) + 0.4, 3.0))
    _overlay(fig, images, res["maps"], f"attention rollout ({res['variant']} variant): input, "
             "then where the decision looks", [f"pred {int(p)}" for p in pred])
    save_png(fig, out / "rollout.png")
    rows = res["rollout"].sum(dim=-1)
    return {"variant": res["variant"], "maps": res["maps"].tolist(),
            "max_row_sum_error": float((rows - 1).abs().max()), "predicted": pred.tolist()}


def run_ig(model, images: torch.Tensor, out: Path, baseline: str = "black", steps: int = 64,
           target: int | None = None) -> dict:
    res = integrated_gradients(model, images, target, baseline, steps)
    maps = res["attributions"].abs().sum(dim=1)
    fig = figure(figsize=(1.2 * len(images) + 0.4, 3.0))
    _overlay(fig, images, maps, f"Integrated Gradients ({baseline} baseline, {steps} steps): "
             "|attribution| summed over channels", [f"class {int(t)}" for t in res["target"]])
    save_png(fig, out / "ig.png")
    return {"baseline": baseline, "steps": steps, "target": res["target"].tolist(),
            "delta_f": res["delta_f"].tolist(), "completeness_gap": res["gap"].tolist(),
            "relative_gap": res["relative_gap"].tolist(),
            "max_relative_gap": float(res["relative_gap"].max()), "maps": maps.tolist()}


def run_robustness(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   out: Path) -> dict:
    res = robustness(model, images, labels, num_classes)
    fig = figure(figsize=(9, 3.4))
    sev = list(range(6))
    for j, metric in enumerate(("accuracy", "ece")):
        ax = fig.add_subplot(1, 2, j + 1)
        for name, rows in res["corruptions"].items():
            ax.plot(sev, [res["clean"][metric]] + [r[metric] for r in rows], marker="o", label=name)
        ax.set_xlabel("severity (0: clean)")
        ax.set_ylabel("top-1 accuracy" if metric == "accuracy" else "ECE (15 bins)")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
    fig.suptitle(f"{res['n']} test images: clean accuracy {res['clean']['accuracy']:.3f}, "
                 f"mean corrupted {res['mean_accuracy']:.3f}", fontsize=9)
    save_png(fig, out / "robustness.png")
    return res


# ---------------------------------------------------------------------------------- driver
def applicable(model, name: str) -> str | None:
    """Why `name` does not apply to `model` (None when it does)."""
    try:
        if name == "filters":
            patch_kernels(model)
        elif name == "posemb":
            position_table(model)
        elif name == "rollout" and is_asvit(model):
            return "attention rollout needs one token sequence through every layer; an As-ViT's " \
                   "window attention changes the grid per stage"
    except UserError as exc:
        return str(exc)
    return None


def analyze_model(model, data, what: Sequence[str] | None = None, images: int = 8,
                  out_dir: str | Path = "analysis", baseline: str = "black", ig_steps: int = 64,
                  rollout_variant: str = "auto", robust_images: int | None = None) -> dict[str, Any]:
    """Run `what` (default: every analysis that applies, the others noted under "skipped") on
    `model` with `data` (a vitscale.data.Data at the model's resolution); the first `images`
    test images for distance / rollout / ig, the test split (or its first `robust_images`) for
    robustness. Writes <what>.png and <what>.json into `out_dir`; returns every result."""
    from vitscale.eval.api import test_split

    names = list(ANALYSES) if what is None else list(what)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"skipped": {}, "seconds": {}, "files": {}}
    for name in names:
        why = applicable(model, name)
        if why is not None:
            if what is not None:
                raise ConfigError(f"{name}: {why}")
            result["skipped"][name] = why
    names = [n for n in names if n not in result["skipped"]]
    if images < 1:
        raise ConfigError(f"--images {images}: analyse at least 1 image")
    split = test_split(data)
    needs = [n for n in names if n in ("distance", "rollout", "ig", "robustness")]
    x = y = None
    if needs:
        limit = images
        if "robustness" in names:  # the whole test split unless robust_images caps it
            limit = max(images, robust_images) if robust_images else None
        xs, ys, seen = [], [], 0
        for bx, by in data.eval_loader(split):
            xs.append(bx)
            ys.append(by)
            seen += len(by)
            if limit is not None and seen >= limit:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        result["split"] = split
    model.eval()
    for name in names:
        start = time.perf_counter()
        if name == "filters":
            res = run_filters(model, out)
        elif name == "posemb":
            res = run_posemb(model, out)
        elif name == "distance":
            res = run_distance(model, x[:images], out)
        elif name == "rollout":
            res = run_rollout(model, x[:images], out, rollout_variant)
        elif name == "ig":
            res = run_ig(model, x[:images], out, baseline, ig_steps)
        else:
            from vitscale.eval.api import check_classes

            check_classes(model, data)
            n = robust_images or len(y)
            res = run_robustness(model, x[:n], y[:n], data.num_classes, out)
        result["seconds"][name] = time.perf_counter() - start
        atomic_write_text(out / f"{name}.json", json.dumps(res) + "\n")
        result["files"][name] = [str(out / f"{name}.png"), str(out / f"{name}.json")]
        result[name] = res
    return result


def analyze_checkpoint(checkpoint: str | Path, source: str, what: Sequence[str] | str | None = None,
                       images: int = 8, out_dir: str | Path | None = None,
                       img_size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """`analyze_model` on a checkpoint `vitscale.models.load` reads; out_dir defaults to
    <run dir>/analysis (./analysis for hf-hub: references)."""
    from vitscale.eval.api import eval_data, load_model, output_dir_for

    names = parse_what(what) if isinstance(what, str) or what is None else parse_what(list(what))
    model = load_model(checkpoint, img_size)
    data = eval_data(model, source, batch_size=64)
    if out_dir is None:
        base = output_dir_for(checkpoint)
        out_dir = (base / "analysis") if base is not None else Path("analysis")
    res = analyze_model(model, data, names, images, out_dir, **kwargs)
    return {"checkpoint": str(checkpoint), "data": source, "out_dir": str(out_dir), **res}
