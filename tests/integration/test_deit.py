"""DeiT's distillation token: the ViT student's two heads, the hard-label term, the test-time mean of
the heads, the CE baseline predicting with [CLS], the digits recipe through the CLI, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from distillery import functional as DF
from distillery.cli import main
from distillery.losses import LossInputs
from distillery.losses.semi_supervised import DeiTLoss
from distillery.models import DeiTAdapter, ViTClassifierConfig, build_model
from distillery.models.vit import DEIT_DIST


def _student(token=True):
    torch.manual_seed(0)
    cfg = ViTClassifierConfig(patch_size=2, depth=1, width=16, heads=2, distillation_token=token)
    return build_model(cfg, (1, 8, 8), 10)


def test_the_prediction_is_the_mean_of_both_heads_unless_switched_off():
    model = _student().eval()
    x = torch.rand(4, 1, 8, 8)
    cls, dist = model.heads(x)
    assert cls.shape == dist.shape == (4, 10) and not torch.allclose(cls, dist)
    torch.testing.assert_close(model(x), (cls + dist) / 2)
    model.mean_heads.fill_(0.0)
    torch.testing.assert_close(model(x), cls)
    assert "mean_heads" in model.state_dict()  # saved with the weights
    plain = _student(token=False).eval()
    assert plain.heads(x)[1] is None and plain(x).shape == (4, 10)


def test_the_adapter_gives_the_terms_both_heads_and_the_hard_term_learns_the_teachers_argmax():
    model = _student()
    x = torch.rand(6, 1, 8, 8)
    out = DeiTAdapter().forward(model, {"x": x, "y": torch.zeros(6, dtype=torch.long)})
    cls, dist = model.heads(x)
    torch.testing.assert_close(out.logits, cls)
    torch.testing.assert_close(out.features[DEIT_DIST], dist)
    teacher = torch.randn(6, 10)
    inputs = LossInputs(student_logits=out.logits, target=torch.full((6,), -100), mask=torch.ones(6, dtype=torch.bool),
                        teacher_logits=teacher, student_features=out.features)  # fmt: skip
    torch.testing.assert_close(DeiTLoss(hard=True)(inputs), DF.cross_entropy(dist, teacher.argmax(-1)))
    torch.testing.assert_close(
        DeiTLoss(hard=False, temperature=3.0)(inputs), DF.forward_kl(dist, teacher, 3.0)
    )
    with pytest.raises(ValueError, match="distillation_token"):
        DeiTLoss()(
            LossInputs(student_logits=cls, target=inputs.target, mask=inputs.mask, teacher_logits=teacher)
        )


@pytest.mark.integration
def test_the_digits_deit_recipe_trains_both_heads_and_the_baseline_predicts_with_cls(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = ["seeds=[0]", "train.steps=6", "train.eval_every=3", "teacher.train.steps=20", f"output.dir={out}",
            "--no-progress"]  # fmt: skip
    assert main(["run", "digits-deit", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) >= {"baseline", "distilled"}
    base = load_file(out / "seed-0" / "baseline" / "student.safetensors")
    dist = load_file(out / "seed-0" / "distilled" / "student.safetensors")
    assert base["mean_heads"].item() == 0.0 and dist["mean_heads"].item() == 1.0
    key = "net.distillation_classifier.weight"
    assert not torch.equal(base[key], dist[key])  # same initial weights: the distillation head learnt
    lines = [json.loads(x) for x in (out / "seed-0" / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert any("deit" in x for x in lines if x.get("split") == "train")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            ["student.distillation_token=false"],
            "loss.deit trains DeiT's distillation head, but the student has none",
        ),
        (['loss={"ce": {}}', "teacher=null"], "distillation_token=true adds a distillation head"),
        (["student.patch_size=3"], "student.patch_size=3 does not divide the image side 8"),
    ],
)
def test_bad_deit_settings_are_user_errors(tmp_path, capsys, changes, message):
    out = tmp_path / "run"
    assert main(["run", "digits-deit", "seeds=[0]", *changes, f"output.dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err
    assert not out.exists()
