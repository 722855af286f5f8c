"""The semi-supervised task end to end on digits: FixMatch, Mean Teacher and Noisy Student through the
CLI, the views each side sees, the mixed batches, resume, and the errors (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distillery.cli import main


def _config(tmp_path: Path, **changes) -> Path:
    cfg = {
        "task": "semi",
        "name": "semi-test",
        "seeds": [0],
        "data": {"name": "digits", "validation": 130, "labelled": 50, "transfer": None, "test": 497},
        "student": {"name": "cnn", "channels": [8, 16], "pool_every": 1, "dropout": 0.1},
        "teacher": {"source": "self"},
        "loss": {"ce": {}, "pseudo_label": {"threshold": 0.0}},
        "train": {"steps": 6, "batch_size": 32, "eval_every": 3, "optimizer": {"name": "adamw", "lr": 0.003}},
        "baseline": {"enabled": True},
    }
    cfg.update(changes)
    path = tmp_path / "semi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(tmp_path, **changes) -> Path:
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0
    return out


def _train_lines(arm_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("split") == "train"]


@pytest.mark.integration
def test_fixmatch_trains_on_labelled_and_pseudo_labelled_rows(tmp_path):
    out = _run(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "semi" and set(summary["models"]) == {"baseline", "distilled"}
    report = (out / "report.md").read_text()
    assert "supervised only" in report and "FixMatch" in report
    base = json.loads((out / "seed-0" / "baseline" / "result.json").read_text())
    dist = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    assert base["steps"] == dist["steps"] == 6 and [h["step"] for h in dist["history"]] == [3, 6]
    assert 0 <= dist["metrics"]["accuracy"] <= 100
    # threshold 0: every row has a pseudo-label, so the term is positive; the baseline has no such term
    assert all(x["pseudo_label"] > 0 for x in _train_lines(out / "seed-0" / "distilled"))
    assert all("pseudo_label" not in x for x in _train_lines(out / "seed-0" / "baseline"))


@pytest.mark.integration
def test_mean_teacher_and_its_consistency_term(tmp_path):
    out = _run(tmp_path, teacher={"source": "ema", "momentum": 0.9},
               loss={"ce": {}, "consistency_mse": {"weight": 5.0}})  # fmt: skip
    lines = _train_lines(out / "seed-0" / "distilled")
    assert lines and all(x["consistency_mse"] >= 0 for x in lines)
    assert any(x["consistency_mse"] > 0 for x in lines)  # independent noise: the two views disagree
    assert "mean teacher" in (out / "report.md").read_text()


@pytest.mark.integration
def test_noisy_student_trains_generations_from_the_previous_one(tmp_path):
    from safetensors.torch import load_file

    wider = {"name": "cnn", "channels": [12, 16], "pool_every": 1, "dropout": 0.3}
    out = _run(tmp_path, teacher={"source": "generations", "generations": 2, "students": [None, wider]},
               noise={"student": {"crop_scale": [0.7, 1.0], "cutout": 0.3}, "teacher": None},
               loss={"ce": {}, "pseudo_label": {"threshold": 0.3, "hard": False}})  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"baseline", "gen-1", "gen-2"}
    g1 = load_file(out / "seed-0" / "gen-1" / "student.safetensors")
    g2 = load_file(out / "seed-0" / "gen-2" / "student.safetensors")
    assert g1["body.0.weight"].shape[0] == 8 and g2["body.0.weight"].shape[0] == 12  # the larger student
    assert "noisy student, generation 2" in (out / "report.md").read_text()


def test_the_students_and_the_teachers_views(tmp_path):
    """The teacher's view differs from the student's (its own seed); with labelled=teacher the labelled
    rows get the weak view; views are a function of (seed, image, step)."""
    from distillery.config import load_config
    from distillery.tasks.semi import TEACHER_VIEW, SemiTask

    cfg = load_config(str(_config(tmp_path, noise={
        "student": {"crop_scale": [0.5, 1.0], "cutout": 0.4}, "teacher": {"crop_scale": [0.9, 1.0]},
        "labelled": "teacher"})))  # fmt: skip
    task = SemiTask(cfg, None)
    data = task.prepare(0)
    transform = task._views(data, teacher_view=True)
    rows = torch.tensor([0, 1, len(data.train) - 1, len(data.train) - 2])  # two labelled, two unlabelled
    batch = data.train.get_batch(rows)
    assert (batch["y"][:2] >= 0).all() and (batch["y"][2:] == -100).all()
    a, b = transform(batch, None, 5), transform(batch, None, 5)
    torch.testing.assert_close(a["x"], b["x"])  # reproducible
    assert not torch.equal(a["x"], transform(batch, None, 6)["x"])  # another step, another view
    torch.testing.assert_close(a["x"][:2], a[TEACHER_VIEW][:2])  # labelled rows: the weak view
    assert not torch.equal(a["x"][2:], a[TEACHER_VIEW][2:])  # unlabelled rows: strong vs weak
    # the labelled images are repeated so that about labelled_fraction of the rows carry labels
    share = (data.train.y >= 0).float().mean().item()
    assert share == pytest.approx(cfg.labelled_fraction, abs=0.05) and data.repeats > 1


def test_labelled_rows_can_have_a_noise_of_their_own(tmp_path):
    """noise.labelled as a noise config: labelled rows get that view (the run seed's draw), unlabelled
    rows the student's; the supervised-only baseline sees the same labelled view."""
    from distillery.config import load_config
    from distillery.data.views import noisy_view
    from distillery.tasks.semi import SemiTask

    own = {"crop_scale": [0.8, 1.0], "hflip": 0.5, "noise": 0.1}
    cfg = load_config(str(_config(tmp_path, noise={"student": {"cutout": 0.5}, "labelled": own})))
    task = SemiTask(cfg, None)
    data = task.prepare(0)
    rows = torch.tensor([0, 1, len(data.train) - 1])
    batch = data.train.get_batch(rows)
    a = task._views(data, teacher_view=True)(batch, None, 4)
    x, ids = batch["x"], batch["index"]
    torch.testing.assert_close(a["x"][:2], noisy_view(x[:2], ids[:2], 4, 0, cfg.noise.labelled))
    torch.testing.assert_close(a["x"][2:], noisy_view(x[2:], ids[2:], 4, 0, cfg.noise.student))
    assert not torch.equal(a["x"][:2], noisy_view(x[:2], ids[:2], 4, 0, cfg.noise.student))
    labelled = data.data.labelled.get_batch(torch.tensor([0, 1]))
    b = task._views(data, teacher_view=False)(labelled, None, 4)
    torch.testing.assert_close(b["x"], a["x"][:2])


def test_the_description_says_when_the_baseline_sees_more_labelled_rows_per_step(tmp_path):
    """Default labelled_fraction (0.125, 15% after whole copies) at batch 32: about 5 labelled rows per
    step against the baseline's 32, and the fix is named; a baseline batch matched to it is silent."""
    from distillery.config import load_config
    from distillery.tasks.semi import SemiTask

    cfg = load_config(str(_config(tmp_path)))
    task = SemiTask(cfg, None)
    data = task.prepare(0)
    assert (data.train.y >= 0).sum().item() / len(data.train) * 32 == pytest.approx(4.85, abs=0.01)
    text = task.describe(data)
    assert "labelled rows per step in the semi-supervised arms vs 32 in the supervised-only baseline" in text
    assert "baseline.train.batch_size=5" in text
    matched = load_config(str(_config(tmp_path, baseline={"enabled": True, "train": {"batch_size": 5}})))
    task = SemiTask(matched, None)
    assert "note:" not in task.describe(task.prepare(0))


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["digits-fixmatch", "digits-mean-teacher", "digits-noisy-student"])
def test_the_digits_semi_recipes_run_through_the_cli(tmp_path, recipe):
    out = tmp_path / "run"
    args = ["seeds=[0]", "train.steps=4", "train.eval_every=2", f"output.dir={out}", "--no-progress"]
    assert main(["run", recipe, *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "semi" and "baseline" in summary["models"] and len(summary["models"]) >= 2


@pytest.mark.integration
def test_a_semi_run_resumes(tmp_path):
    cfg = _config(tmp_path, train={"steps": 6, "batch_size": 32, "eval_every": 3, "checkpoint_every": 3,
                                   "optimizer": {"name": "adamw", "lr": 0.003}})  # fmt: skip
    out = tmp_path / "run"
    assert main(["run", str(cfg), f"output.dir={out}", "--no-progress"]) == 0
    first = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())["metrics"]
    assert main(["run", str(cfg), f"output.dir={out}", "--resume", "--no-progress"]) == 0
    again = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())["metrics"]
    assert again == first


@pytest.mark.integration
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"name": "digits", "labelled": 50, "transfer": 0}}, "data.transfer=0: a semi-supervised run"),
        ({"data": {"name": "digits", "labelled": None, "transfer": None}}, "data.labelled is null"),
        ({"loss": {"ce": {}}}, "no term learns from the teacher"),
        ({"loss": {"pseudo_label": {}}}, "needs `ce`"),
        ({"loss": {"ce": {}, "pseudo_label": {"threshold": 1.5}}}, "loss.pseudo_label.threshold"),
        ({"loss": {"ce": {}, "dino": {}}}, "dino"),
        ({"teacher": {"source": "generations", "generations": 2, "students": [None]}}, "one per generation"),
        ({"teacher": {"source": "generations"}, "baseline": {"enabled": False}}, "set baseline.enabled=true"),
        ({"teacher": {"source": "generations", "generations": 1,
                      "students": [{"name": "cnn", "channels": [4, 8], "pool_every": 1}]}},
         "fewer than its teacher"),
        ({"teacher": {"source": "ema", "momentum": 1.5}}, "teacher.momentum"),
        ({"labelled_fraction": 1.0}, "labelled_fraction"),
        ({"noise": {"student": {"cutout": 1.0}}}, "noise.student.cutout"),
    ],
)  # fmt: skip
def test_bad_semi_settings_are_user_errors_and_write_nothing(tmp_path, capsys, changes, message):
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err
    assert not out.exists()
