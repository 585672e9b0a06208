"""`vitscale distill` (vitscale.objectives.distill): the losses against independent formulas, the
DeiT distillation token against timm, a frozen teacher, teachers of other formats and
resolutions, exact resume, the digits claims in short, and the one-line refusals. The full runs
(3 seeds, the demo recipe's teacher) are benchmarks/distill.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vitscale.cli import main
from vitscale.config import load_config
from vitscale.models import create_model, load, save
from vitscale.objectives import hard_distill, kl_distill
from vitscale.train import Trainer, run

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# The teacher: test_eval's small ViT (0.74 test accuracy, the session fixture `digits_teacher`).
# The student: width 32 instead of 64, 4x fewer parameters in its blocks.
STUDENT = ["model.name=Ti/2", "model.overrides.width=32", "model.overrides.depth=2",
           "model.overrides.heads=2", "model.overrides.mlp_dim=64", "model.overrides.posemb=learn",
           "model.overrides.pool=gap", "data.img_size=16", "data.batch_size=32",
           "data.crop_scale_min=0.3", "progress=false"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


# ---------------------------------------------------------------------------------- losses
def test_kl_equals_big_vision_and_deit_formulas():
    """big_vision's `kl` distance (numpy: t^2 sum p_t (log p_t - log p_s), mean over examples) and
    DeiT's soft loss (F.kl_div of log-softmaxes, log_target, sum, t^2 / numel), written here."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    for t in (1.0, 2.0, 4.0):
        s, te = student.double().numpy() / t, teacher.double().numpy() / t
        log_ps = s - np.log(np.exp(s).sum(-1, keepdims=True))
        log_pt = te - np.log(np.exp(te).sum(-1, keepdims=True))
        big_vision = t * t * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean()
        probs = F.softmax(teacher / t, dim=-1)
        assert kl_distill(student, probs, t).item() == pytest.approx(big_vision, abs=1e-6)
        deit = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="sum", log_target=True) * (t * t) / student.numel()
        assert kl_distill(student, probs, t, "numel").item() == pytest.approx(deit.item(), abs=1e-6)
        # in float32, as training computes it: the same to float32 rounding
        fp32 = kl_distill(student.float(), probs.float(), t).item()
        assert fp32 == pytest.approx(big_vision, rel=1e-6)
    # A student equal to the teacher has zero KL; hard distillation is CE to the top class.
    assert kl_distill(teacher, F.softmax(teacher, -1)).item() == pytest.approx(0.0, abs=1e-6)
    ce = -F.log_softmax(student, -1)[torch.arange(6), teacher.argmax(-1)].mean()
    assert hard_distill(student, F.softmax(teacher, -1)).item() == pytest.approx(ce.item(), abs=1e-6)


def test_distillation_token_model_equals_timm_deit(tmp_path):
    """A timm DeiT distilled state dict loads as a vitscale model with the token detected; the
    logits (mean of both heads) and the two heads apart equal timm's; counts are exact."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=7,
                               img_size=32).eval()
    save_file(theirs.state_dict(), str(tmp_path / "deit.safetensors"))
    ours = load(tmp_path / "deit.safetensors").eval()
    assert ours.cfg.dist_token and ours.cfg.num_prefix_tokens == 2
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    from vitscale.models import count

    assert count(ours.cfg).params == ours.num_params()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        theirs.set_distilled_training(True)
        theirs.train()
        cls_t, dist_t = theirs(x)
        cls_o, dist_o = ours(x, outputs="heads")
    torch.testing.assert_close(cls_o, cls_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(dist_o, dist_t, atol=1e-5, rtol=0)
    assert not torch.allclose(cls_o, dist_o)  # two heads on two tokens
    # A plain checkpoint gains a token (the class token's copy, its row and head) when asked.
    plain = create_model("Ti/16", img_size=32, num_classes=7)
    save(plain, tmp_path / "plain")
    grown = load(tmp_path / "plain", dist_token=True)
    assert torch.equal(grown.dist_token, plain.cls_token)
    assert torch.equal(grown.head_dist.weight, plain.head.weight)
    assert torch.equal(grown.pos_embed[:, 1], plain.pos_embed[:, 0])


def test_an_ensemble_averages_its_teachers_probabilities(tmp_path):
    """Two teachers (one at its own resolution, resized to), frozen: probabilities are the mean
    of each one's softmax(logits / t) on the same images; bf16 weights stay bf16."""
    from vitscale.config import DistillConfig
    from vitscale.objectives import load_teachers

    for seed, size in ((1, 16), (2, 24)):
        torch.manual_seed(seed)
        save(create_model("Ti/2", width=32, depth=1, heads=2, mlp_dim=64, img_size=size,
                          num_classes=10), tmp_path / f"t{seed}")
    cfg = DistillConfig(teachers=[str(tmp_path / "t1"), str(tmp_path / "t2")])
    teachers = load_teachers(cfg, num_classes=10, img_size=16, device=torch.device("cpu"))
    x = torch.randn(4, 3, 16, 16)
    one = load(tmp_path / "t1").eval()
    two = load(tmp_path / "t2", img_size=16).eval()  # the student's size: resampled on load
    with torch.no_grad():
        want = (F.softmax(one(x) / 2, -1) + F.softmax(two(x) / 2, -1)) / 2
    torch.testing.assert_close(teachers.probs(x, 2.0), want, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for m in teachers.models for p in m.parameters())
    half = load_teachers(DistillConfig(teachers=[str(tmp_path / "t1")], teacher_dtype="bfloat16"),
                         num_classes=10, img_size=16, device=torch.device("cpu"))
    assert next(half.models[0].parameters()).dtype == torch.bfloat16
    assert half.probs(x).dtype == torch.float32


# ---------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def distilled(digits_teacher, tmp_path_factory):
    """Student runs of 100 steps, seed 0: on labels, distilled (consistent), fixed teacher."""
    teacher, _ = digits_teacher
    out = tmp_path_factory.mktemp("distill")
    common = [*STUDENT, "steps=100", "eval_every=100"]
    teach = ["objective=distill", f"distill.teachers=[{teacher}]"]
    runs = {"labels": [], "consistent": teach, "fixed": [*teach, "distill.consistent=false"]}
    return {name: run(load_config(DEMO, [*common, *extra, f"out_dir={out / name}"])).metrics
            for name, extra in runs.items()}


def test_distilled_student_beats_labels_and_the_fixed_teacher(distilled, digits_teacher):
    """The paper's two findings, small: distillation beats label training at equal steps, and
    the consistent (online, same view) teacher beats the fixed one on agreement. Seeds 0-2:
    test accuracy labels 0.28 / 0.34 / 0.33, distilled 0.36 / 0.41 / 0.40; agreement distilled
    0.45 / 0.49 / 0.47, fixed teacher 0.30 / 0.43 / 0.43."""
    _, teacher_accuracy = digits_teacher
    labels, consistent, fixed = distilled["labels"], distilled["consistent"], distilled["fixed"]
    assert consistent["test/accuracy"] > labels["test/accuracy"] + 0.02, distilled
    assert consistent["test/agreement"] > fixed["test/agreement"] + 0.02, distilled
    assert consistent["test/teacher_accuracy"] == pytest.approx(teacher_accuracy, abs=1e-9)
    assert "test/agreement" not in labels


def test_teacher_stays_frozen_in_any_format_and_resolution(digits_teacher, tmp_path, capsys):
    """A timm state dict teacher at 24 px (the student's crop resized), DeiT's token with hard
    targets: the teacher's weights are bitwise unchanged, it holds no gradient and no optimizer
    state, and the CLI reports accuracy and agreement."""
    teacher_run, _ = digits_teacher
    from vitscale.models.weights import save_timm

    timm_file = save_timm(load(teacher_run / "model", img_size=24), tmp_path / "teacher.pth")
    before = {k: v.clone() for k, v in torch.load(timm_file, weights_only=True).items()}
    cfg = load_config(DEMO, [*STUDENT, "model.overrides.pool=token", "steps=6", "eval_every=6",
                             "objective=distill", f"distill.teachers=[{timm_file}]",
                             "distill.mode=token", "distill.teacher_img_size=24",
                             "distill.teacher_overrides={heads: 4}", f"out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    trainer.fit()
    (teacher,) = trainer.objective.teachers.models
    assert teacher.cfg.img_size == (24, 24) and trainer.model.cfg.dist_token
    for name, param in teacher.state_dict().items():
        assert torch.equal(param, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters()}
    code = main(["distill", "--teacher", str(timm_file), "--config", str(DEMO), *STUDENT,
                 "model.overrides.pool=token", "steps=2", "distill.mode=token",
                 "distill.token_target=soft", "distill.teacher_img_size=24",
                 "distill.teacher_dtype=bfloat16", "distill.teacher_overrides={heads: 4}",
                 f"out_dir={tmp_path / 'cli'}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[-3].startswith("test accuracy: ")
    assert lines[-1].startswith("agreement: ")
    final = _records(tmp_path / "cli")[-1]
    assert final["split"] == "test" and 0 <= final["test/agreement"] <= 1 and final["test/kl"] >= 0


def test_features_with_projection_resume_exactly(digits_teacher, tmp_path):
    """Features mode (a width-32 student matched to the width-64 teacher through a learned
    projection), fixed teacher, Mixup: killed after its step-3 checkpoint and resumed, the run
    ends bitwise where the uninterrupted one does, projection included."""
    teacher, _ = digits_teacher
    settings = [*STUDENT, "steps=6", "ckpt_every=3", "eval_every=6", "data.mixup_alpha=1.0",
                "objective=distill", f"distill.teachers=[{teacher}]", "distill.mode=features",
                "distill.consistent=false"]
    whole = run(load_config(DEMO, [*settings, f"out_dir={tmp_path / 'whole'}"]))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part, ignore=shutil.ignore_patterns("model"))
    shutil.rmtree(part / "checkpoints" / "step-000000006")
    (part / "checkpoints" / "latest").write_text("step-000000003\n")
    resumed = run(load_config(DEMO, [*settings, f"out_dir={part}"]))
    assert resumed.metrics == whole.metrics
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-000000006" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-000000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(part / "checkpoints" / "step-000000003" / "model.safetensors")
    assert a["objective.weight"].shape == (64, 32)
    assert not torch.equal(a["objective.weight"], start["objective.weight"])  # it is trained


def test_bad_teachers_are_one_line_errors(digits_teacher, tmp_path, capsys):
    teacher, _ = digits_teacher
    five = create_model("Ti/2", width=64, depth=2, heads=4, mlp_dim=128, img_size=16,
                        num_classes=5, posemb="learn", pool="gap")
    save(five, tmp_path / "five")
    headless = create_model("Ti/2", width=64, depth=2, heads=4, mlp_dim=128, img_size=16,
                            num_classes=0, posemb="learn", pool="gap")
    save(headless, tmp_path / "headless")
    base = ["--config", str(DEMO), *STUDENT, "steps=2", f"out_dir={tmp_path / 'out'}"]
    cases = [
        (["--teacher", str(tmp_path / "missing")], "no such file or folder"),
        (["--teacher", str(tmp_path / "five")], "predicts 5 classes but the data has 10"),
        (["--teacher", str(tmp_path / "headless")], "is not a classifier"),
        (["--teacher", str(teacher), "distill.mode=token"], "set model.overrides.pool=token"),
        (["--teacher", str(teacher), "--teacher", str(teacher), "distill.mode=features"],
         "matches one teacher's features"),
    ]
    for args, words in cases:
        assert main(["distill", *args, *base]) == 2, args
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()  # nothing written when refused
    # features mode takes a teacher of other classes (its features only; no agreement then)
    assert main(["distill", "--teacher", str(tmp_path / "five"), *base, "distill.mode=features"]) == 0
    assert "agreement" not in capsys.readouterr().out
