"""digits-deepinversion end to end through the command line, reduced: the distilled student learns from
synthesised inputs only, its record and sample grid are written, and a resumed run redoes nothing."""

from __future__ import annotations

import json

import pytest

from distillery.cli import main

QUICK = ["seeds=[0]", "teacher.train.steps=150", "data_free.images=256", "data_free.batch_size=128",
         "data_free.steps=100", "train.steps=300", "baseline.train.steps=300", "train.eval_every=150",
         "--no-progress"]  # fmt: skip


@pytest.mark.integration
def test_deepinversion_recipe_trains_a_student_on_synthesised_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "run"
    assert main(["run", "digits-deepinversion", f"output.dir={out_dir}", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "DeepInversion: batch 2/2" in out
    arm = out_dir / "seed-0" / "distilled"
    record = json.loads((arm / "result.json").read_text())
    assert record["train_examples"] == 256  # the synthesised set, not the 1,170 real digits
    assert record["data_free"]["images"] == 256 and record["data_free"]["teacher_accuracy"] > 50.0
    assert (arm / "synthetic.png").stat().st_size > 1000
    assert record["metrics"]["accuracy"] > 20.0  # learnt something from the teacher alone (chance: 10%)
    assert main(["run", "digits-deepinversion", f"output.dir={out_dir}", *QUICK, "--resume"]) == 0
    assert capsys.readouterr().out.count("already complete") == 2
