"""vitscale.detection: backbones' strides and pyramid size, torchvision detectors on them, the
shapes set, COCO data checks, box mAP, `vitscale detect train | eval` and exact resume."""

from __future__ import annotations

import json
import math
import shutil
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from vitscale.detection import asvit_backbone, detector, vitdet_backbone
from vitscale.detection.backbone import SimpleFeaturePyramid
from vitscale.errors import ConfigError, DataError
from vitscale.models import create_model

needs_coco = pytest.mark.skipif(
    find_spec("pycocotools") is None,
    reason="pycocotools is not installed (pip install 'vitscale[detection]' or '.[dev]')")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detect-shapes.yaml"
SMALL = ["data.batch_size=2", "model.overrides.width=32", "model.overrides.mlp_dim=64",
         "out_channels=32", "representation_size=128", "progress=false"]


@pytest.fixture(autouse=True)
def one_thread():
    # Detection's many small ops run several times faster on one thread of a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vit(**kw):
    torch.manual_seed(0)
    return create_model("Ti/16", img_size=128, width=32, depth=2, heads=2, mlp_dim=64,
                        num_classes=0, **kw)


@pytest.mark.parametrize("size", [(128, 128), (160, 160), (128, 192), (192, 160)])
def test_vitdet_strides(size):
    backbone = vitdet_backbone(_vit(), out_channels=16, window_size=4, global_blocks=[1])
    assert backbone.strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, *size))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for stride, fmap in zip(backbone.strides, feats.values()):
        assert fmap.shape == (1, 16, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_asvit_strides():
    model = create_model("asvit:8,2,3|4,1,2|4,1,4|4,1,6|4,8", img_size=128, num_classes=0)
    backbone = asvit_backbone(model, out_channels=16)
    assert backbone.strides == [4, 8, 16, 32, 64]
    for size in ((128, 128), (160, 96)):
        with torch.no_grad():
            feats = backbone(torch.randn(1, 3, *size))
        shapes = [tuple(f.shape[-2:]) for f in feats.values()]
        assert shapes == [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in backbone.strides]
    with pytest.raises(ConfigError, match="asvit_backbone"):
        vitdet_backbone(model)


def test_simple_feature_pyramid_params_vit_b():
    d, c = 768, 256  # ViT-B's width, the pyramid's channels

    def head(cin):  # 1x1 conv (no bias) + LayerNorm, 3x3 conv (no bias) + LayerNorm
        return cin * c + 2 * c + c * c * 9 + 2 * c

    expected = (
        # scale 4: ConvT(d -> d/2, 2x2, bias), LayerNorm(d/2), GELU, ConvT(d/2 -> d/4, 2x2, bias)
        d * (d // 2) * 4 + d // 2 + 2 * (d // 2) + (d // 2) * (d // 4) * 4 + d // 4 + head(d // 4)
        # scale 2: ConvT(d -> d/2, 2x2, bias)
        + d * (d // 2) * 4 + d // 2 + head(d // 2)
        # scale 1: identity; scale 0.5: 2x2 max-pool; the stride-64 level: a max-pool of the last
        + head(d) + head(d)
    )
    pyramid = SimpleFeaturePyramid(d, (4, 2, 1, 0.5), c)
    assert sum(p.numel() for p in pyramid.parameters()) == expected


def test_vitdet_backbone_from_a_checkpoint_file(tmp_path):
    from vitscale.models import save

    vit = _vit(posemb="learn")
    save(vit, tmp_path / "vit")
    backbone = vitdet_backbone(tmp_path / "vit", out_channels=16)
    x = torch.randn(1, 3, 96, 160)  # another grid than the 8x8 the posemb was built for
    with torch.no_grad():
        torch.testing.assert_close(backbone.body.forward_features(x),
                                   vitdet_backbone(vit, out_channels=16).body.forward_features(x))


def test_unpadded_input_is_padded_with_a_note():
    backbone = vitdet_backbone(_vit(), out_channels=16)
    x = torch.randn(1, 3, 100, 90)
    with pytest.warns(UserWarning, match="not divisible by the patch 16; zero-padded"):
        feats = backbone(x)
    with torch.no_grad():
        ref = backbone(torch.nn.functional.pad(x, (0, 6, 0, 12)))
    for a, b in zip(feats.values(), ref.values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet", "maskrcnn"])
def test_detectors_on_the_backbone(kind):
    det = detector(kind, vitdet_backbone(_vit(), out_channels=16), num_classes=3, min_size=160,
                   max_size=160, representation_size=64) if kind != "retinanet" else \
        detector(kind, vitdet_backbone(_vit(), out_channels=16), num_classes=3, min_size=160,
                 max_size=160)
    det.eval()
    images = [torch.rand(3, 160, 160)]
    with torch.no_grad():
        batch, _ = det.transform(images)
        feats = det.backbone(batch.tensors)
        out = det(images)[0]
    # Images are padded to the coarsest stride (64), so torchvision's anchor strides are exact.
    assert batch.tensors.shape[-2:] == (192, 192)
    assert [batch.tensors.shape[-1] // f.shape[-1] for f in feats.values()] == [4, 8, 16, 32, 64]
    assert {"boxes", "scores", "labels"} <= set(out)
    assert kind != "maskrcnn" or "masks" in out


def test_detector_options_and_layer_decay():
    from vitscale.config import OptimConfig
    from vitscale.optim import param_groups

    backbone = vitdet_backbone(_vit(), out_channels=16)
    # torchvision would pass an unknown option on to its transform, which drops it silently.
    with pytest.raises(ConfigError, match=r"FasterRCNN takes no option\(s\) \['box_batch'\]"):
        detector("fasterrcnn", backbone, 3, box_batch=64)
    with pytest.raises(ConfigError, match="counts the background"):
        detector("fasterrcnn", backbone, 1)
    det = detector("fasterrcnn", backbone, 3, representation_size=32, box_batch_size_per_image=64)
    assert det.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    groups = param_groups(det, OptimConfig(lr=1.0, layer_decay=0.5))
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lrs["backbone.body.blocks.0.attn.qkv.weight"] == 0.25  # depth 2: 0.5^(2 - 0)
    assert lrs["backbone.body.patch_embed.proj.weight"] == 0.125
    assert lrs["backbone.body.norm.weight"] == 1.0
    assert lrs["backbone.pyramid.levels.0.lateral.weight"] == 1.0
    assert lrs["roi_heads.box_predictor.cls_score.weight"] == 1.0


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vitscale.detection.synthetic import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), 2, 128, seed=0)


def test_synthetic_shapes(shapes, tmp_path):
    from PIL import Image

    from vitscale.detection.synthetic import make_shapes

    images, ann = shapes.removeprefix("coco:").split(",")
    doc = json.loads(Path(ann).read_text())
    assert [c["name"] for c in doc["categories"]] == ["square", "circle", "triangle"]
    assert len(doc["images"]) == 2 and doc["annotations"]
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        img = doc["images"][a["image_id"] - 1]
        pixels = torch.from_numpy(np.array(Image.open(Path(images) / img["file_name"])))
        assert pixels.shape == (img["height"], img["width"], 3)
        # A square fills its box; every shape touches all four sides of its box.
        inside = pixels[y:y + h, x:x + w].max(-1).values >= 200
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        if a["category_id"] == 1:
            assert inside.all()
    again = make_shapes(tmp_path / "again", 2, 128, seed=0)
    assert Path(again.split(",")[1]).read_text() == Path(ann).read_text()


def _coco(tmp_path, doc, name="ann.json"):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (64, 48)).save(images / "a.png")
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return f"coco:{images},{path}"


def _doc(**ann):
    return {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 7, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20],
                             "iscrowd": 0, "area": 400, **ann}]}


@needs_coco
def test_coco_bad_input(tmp_path):
    from vitscale.detection.data import CocoSet

    with pytest.raises(DataError, match="annotation file .*missing.json.* does not exist"):
        CocoSet(f"coco:{tmp_path},{tmp_path / 'missing.json'}")
    with pytest.raises(DataError, match="is not valid JSON"):
        CocoSet(_coco(tmp_path, '{"images": [', "broken.json"))
    with pytest.raises(DataError, match="no 'annotations' list"):
        CocoSet(_coco(tmp_path, {"images": [], "categories": []}, "partial.json"))
    with pytest.raises(DataError, match=r"annotation 1 has bbox \[100, 10, 5, 5\] outside its 64x48"):
        CocoSet(_coco(tmp_path, _doc(bbox=[100, 10, 5, 5]), "outside.json"))
    with pytest.raises(DataError, match="positive width and height"):
        CocoSet(_coco(tmp_path, _doc(bbox=[1, 1, 0, 5]), "empty.json"))
    with pytest.raises(DataError, match="category_id 3"):
        CocoSet(_coco(tmp_path, _doc(category_id=3), "cat.json"))
    with pytest.raises(ConfigError, match="coco:IMAGES_DIR,ANNOTATIONS.json"):
        CocoSet("imagefolder:x")
    # Partly outside: clipped for training, counted; labels map to 1..K.
    data = CocoSet(_coco(tmp_path, _doc(bbox=[50, 40, 30, 30]), "clip.json"))
    assert data.clipped == 1 and data.num_classes == 2
    image, target = data[0]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].tolist() == [[50.0, 40.0, 64.0, 48.0]] and target["labels"].tolist() == [1]


@needs_coco
def test_coco_map_closed_forms(shapes):
    from vitscale.detection.data import CocoSet
    from vitscale.detection.metrics import coco_map

    data = CocoSet(shapes)
    truth = [(t["image_id"], b, lab) for _, t in (data[i] for i in range(len(data)))
             for b, lab in zip(t["boxes"].tolist(), t["labels"].tolist())]

    def entry(image_id, box, label, score):
        return {"image_id": int(image_id), "category_id": data.category_ids[label - 1],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}

    exact = [entry(i, b, lab, 0.9) for i, b, lab in truth]
    assert coco_map(data, exact)["ap"] == pytest.approx(1.0)
    # One unmatched detection ranked above every true one per object: precision 1/2 at every
    # recall, so AP = 0.5 at every IoU threshold.
    misses = [entry(i, [-100, -100, -90, -90], lab, 0.95) for i, _, lab in truth]
    got = coco_map(data, exact + misses)
    assert got["ap50"] == pytest.approx(0.5) and got["ap"] == pytest.approx(0.5)
    assert coco_map(data, [])["ap50"] == 0.0


@needs_coco
def test_detect_train_eval_step_and_cli(shapes, tmp_path, capsys):
    from vitscale.cli import main

    out = tmp_path / "run"
    started = time.perf_counter()
    code = main(["detect", "train", "--config", str(CONFIG), "--data", shapes, "steps=1",
                 f"out_dir={out}", "optim.layer_decay=0.75", *SMALL])
    assert code == 0 and main(["detect", "eval", str(out)]) == 0
    assert time.perf_counter() - started < 10
    text = capsys.readouterr().out
    assert "box AP" in text and "eval-detect-" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (1, "val")]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(rows[0])
    saved = json.loads(next(out.glob("eval-detect-*-step1.json")).read_text())
    assert saved["ap50"] == rows[1]["ap50"] and saved["images"] == 2
    assert (out / "checkpoints" / "step-000000001").is_dir() and (out / "backbone").is_dir()
    assert main(["detect", "eval", str(tmp_path)]) == 2
    assert "detect train` run directory" in capsys.readouterr().err


@needs_coco
def test_short_training_reaches_ap50_and_resumes_exactly(tmp_path):
    """The benchmark's claim in small: 25 steps on two 64 px one-shape images reach AP50 >= 0.5
    on them (about 1 with this seed; 0 untrained); and a run resumed from its step-24 checkpoint
    ends with the uninterrupted run's weights exactly."""
    from vitscale.detection.synthetic import make_shapes
    from vitscale.detection.train import train_detector
    from vitscale.train.checkpoint import read_checkpoint

    source = make_shapes(tmp_path / "s", 2, 64, seed=1, max_objects=1, min_side=16, max_side=28)
    settings = [f"data.train={source}", "steps=25", "optim.lr=3e-3", "schedule.warmup_steps=5",
                "data.img_size=64", "ckpt_every=24", "keep_checkpoints=3", *SMALL]
    a = train_detector(CONFIG, [*settings, f"out_dir={tmp_path / 'a'}"])
    assert a.metrics["ap50"] >= 0.5
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-000000025")
    (b / "checkpoints" / "latest").unlink()
    kept = (b / "checkpoints" / "step-000000024").stat().st_ino
    resumed = train_detector(CONFIG, [*settings, f"out_dir={b}"])
    # Resumed (one step run), not retrained: step 24's folder was not written again.
    assert (b / "checkpoints" / "step-000000024").stat().st_ino == kept
    assert resumed.step == 25 and resumed.metrics == a.metrics
    wa = read_checkpoint(tmp_path / "a" / "checkpoints" / "step-000000025").weights
    wb = read_checkpoint(b / "checkpoints" / "step-000000025").weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [25]
