"""Every shipped language-model recipe runs end to end through the CLI in a reduced setting."""

from __future__ import annotations

import json

import pytest

from distillery.cli import main
from distillery.config import load_config
from distillery.recipes import list_recipes

ARITHMETIC = ["teacher.train.steps=6", "train.steps=6", "train.eval_every=3", "data.arithmetic.train=120",
              "data.arithmetic.validation=10", "data.arithmetic.test=10", "--no-progress"]  # fmt: skip
AUSTEN = ["teacher.train.steps=4", "train.steps=4", "train.eval_every=2", "data.max_train_blocks=48",
          "data.max_eval_blocks=8", "data.seq_len=32", "data.tokenizer.vocab_size=300", "--no-progress"]  # fmt: skip
RECIPES = {
    "lm-arithmetic": ARITHMETIC,
    "lm-seqkd": ARITHMETIC,
    "lm-gkd": [*ARITHMETIC, "method.student_lambda=1.0"],  # every batch sampled by the student
    "lm-speculative": ARITHMETIC,
    "lm-paced": [*ARITHMETIC, "method.paced.from_step=3", "method.paced.every=1"],
    "lm-fkl-then-rkl": [*AUSTEN, "train.log_every=1"],
    "lm-cross-tokenizer": AUSTEN,
    "lm-opsd": ARITHMETIC,
    "lm-sd-zero": ARITHMETIC,
    "lm-sdft": ARITHMETIC,
    "lm-prompt-distill": [
        "teacher.train.steps=4",
        "train.steps=4",
        "train.eval_every=2",
        "data.facts.entities=3",
        "data.facts.base_entities=3",
        "data.facts.validation=4",
        "data.max_eval_blocks=6",
        "--no-progress",
    ],
}


def test_every_lm_recipe_is_listed_with_its_time():
    listed = {r.name: r for r in list_recipes()}
    for name in RECIPES:
        assert name in listed, name
        assert "minute" in listed[name].duration and "TIME" not in listed[name].duration, name
        assert load_config(name).task == "lm"


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_lm_recipe_runs_end_to_end(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", recipe, *RECIPES[recipe], f"output.dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    assert summary["paired_distilled_minus_baseline"]["perplexity"]["n"] == 1
    printed = capsys.readouterr().out
    assert "student KD" in printed
    arm = out / "seed-0" / "distilled"
    record = json.loads((arm / "result.json").read_text())
    train = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    cfg = load_config(recipe)
    if recipe == "lm-cross-tokenizer":  # one teacher forward per batch, through the texts
        assert record["teacher_calls"] == {"calls": 4, "weights": "frozen"}
    if recipe not in ("lm-fkl-then-rkl", "lm-cross-tokenizer"):
        assert 0.0 <= record["metrics"]["task_accuracy"] <= 100.0
    if recipe == "lm-seqkd":
        assert list((tmp_path / "cache" / "sequences").glob("seqkd-*.jsonl"))  # the teacher's answers, cached
    if recipe in ("lm-gkd", "lm-speculative"):
        assert record["sampling"]["on_policy_fraction"] == 1.0  # lambda 1: every batch sampled
        assert cfg.method.name == {"lm-gkd": "on_policy", "lm-speculative": "speculative"}[recipe]
    if recipe == "lm-speculative":
        assert 0.0 <= record["sampling"]["acceptance_rate"] <= 1.0
    if recipe in ("lm-opsd", "lm-prompt-distill"):  # the model teaches itself: one teacher forward per batch
        steps = 4 if recipe == "lm-prompt-distill" else 6
        assert record["teacher_calls"] == {"calls": steps, "weights": "initial"}
    if recipe == "lm-sd-zero":  # every batch: attempts judged, then revised by the model itself
        assert 0.0 <= record["sampling"]["reward"] <= 1.0 and "revised_reward" in record["sampling"]
        assert record["teacher_calls"] == {"calls": 6, "weights": "initial"}
    if recipe == "lm-sdft":
        assert "rewrites pass the verifier" in printed
    if recipe == "lm-paced":
        assert 0.0 <= record["sampling"]["mean_pass_rate"] <= 1.0  # weights from step 3 on
    if recipe == "lm-fkl-then-rkl":  # forward KL before epoch 2, reverse KL from epoch 2 on
        assert any(r["epoch"] < 2 for r in train) and any(r["epoch"] >= 2 for r in train)
        for r in train:
            divergence = r["forward_kl"] if r["epoch"] < 2 else r["reverse_kl"]
            assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * divergence, rel=1e-6)


@pytest.mark.integration
def test_a_model_trained_without_a_teacher_is_not_called_distilled(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    no_teacher = [a for a in AUSTEN if not a.startswith("teacher.")]
    assert main(["run", "lm-teacher", *no_teacher, "student.hidden_size=32", f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "student (ce)" in printed and "student KD" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["distilled"]["label"] == "student (ce)"
