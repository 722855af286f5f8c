"""Every saved student carries a model card; ``output.push_to_hub`` uploads a complete folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distillery.cli import main
from distillery.experiment import cards
from distillery.fileio import verify_manifest

DIGITS = [
    "run", "digits-kd", "seeds=[0]", "teacher.train.steps=10", "teacher.ensemble=1", "train.steps=12",
    "baseline.train.steps=12", "--no-progress",
]  # fmt: skip
LM = [
    "run", "lm-arithmetic", "teacher.train.steps=4", "train.steps=4", "train.eval_every=2",
    "data.arithmetic.train=60", "data.arithmetic.validation=6", "data.arithmetic.test=6", "--no-progress",
]  # fmt: skip


@pytest.mark.integration
def test_a_classification_student_card_says_what_from_what_how_and_how_well(tmp_path):
    run_dir = tmp_path / "run"
    assert main([*DIGITS, "loss.forward_kl.temperature=3", f"output.dir={run_dir}"]) == 0
    arm = run_dir / "seed-0" / "distilled"
    card = (arm / "README.md").read_text()
    record = json.loads((arm / "result.json").read_text())
    baseline = json.loads((run_dir / "seed-0" / "baseline" / "result.json").read_text())
    assert card.startswith("---\nlibrary_name: distillery\n")
    for section in ("## Teacher", "## Method", "## Data", "## Training", "## Results", "## Reproduce"):
        assert section in card, section
    assert "name: cnn" in card and "temperature: 3.0" in card and "970 transfer" in card
    assert f"| student KD | {record['metrics']['accuracy']:.4g} |" in card
    assert (
        f"| paired baseline (same seed, same initial weights) | {baseline['metrics']['accuracy']:.4g} |"
        in card
    )
    assert "loss.forward_kl.temperature=3" in card and str(run_dir / "config.yaml") in card
    assert "README.md" in record["files"]  # checked on resume like the weights
    assert (run_dir / "seed-0" / "baseline" / "README.md").is_file()
    # the report and the summary say what ran
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"]["loss"]["forward_kl"]["temperature"] == 3.0
    assert summary["method"]["teacher"]["source"] == "frozen"
    report = (run_dir / "report.md").read_text()
    assert "## Method" in report and "temperature: 3.0" in report and "training_loss.png" in report
    assert (run_dir / "training_loss.png").stat().st_size > 0


@pytest.mark.integration
def test_an_lm_student_card_sits_in_its_save_pretrained_folder_and_push_uploads_it(tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(cards, "push_to_hub", lambda repo, folder: uploads.append((repo, folder)) or "url")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    monkeypatch.setattr("distillery.experiment.runner.push_to_hub", cards.push_to_hub)
    assert main([*LM, "output.push_to_hub=me/tiny-student", f"output.dir={run_dir}"]) == 0
    model = run_dir / "seed-0" / "distilled" / "model"
    card = (model / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "perplexity" in card
    assert uploads == [("me/tiny-student", model)]
    names = {p.name for p in model.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names, names


@pytest.mark.integration
@pytest.mark.parametrize("members", [1, 2])
def test_a_trained_teacher_gets_a_card_in_its_cache_entry_and_the_card_says_how_to_reuse_it(
    tmp_path, monkeypatch, members
):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    trained = [*DIGITS, f"teacher.ensemble={members}"]
    assert main([*trained, f"output.dir={run_dir}"]) == 0
    info = json.loads((run_dir / "seed-0" / "teacher.json").read_text())
    entry = Path(info["source"])
    card = (entry / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: distillery\n") and "- teacher" in card
    assert f"| teacher | {info['metrics']['accuracy']:.4g} |" in card
    assert f"({info['params']:,} parameters)" in card and "name: cnn" in card and "steps: 10" in card
    manifest = json.loads((entry / "MANIFEST.json").read_text())["files"]
    assert "README.md" in manifest and "model.safetensors" in manifest
    verify_manifest(entry)  # the card is covered by the entry's checksums
    # the card's reuse line works as written: a run that loads the entry as a fixed teacher
    reuse = re.search(r"`(teacher\.train=null teacher\.checkpoint=\S+)`", card).group(1).split()
    again = tmp_path / "again"
    assert main([*DIGITS, *reuse, f"output.dir={again}"]) == 0  # teacher.ensemble=1: every member loads
    loaded = json.loads((again / "seed-0" / "teacher.json").read_text())
    assert loaded["loaded"] and loaded["metrics"] == info["metrics"]
    # a cached teacher's card is not rewritten by the runs that reuse it
    before = (entry / "README.md").stat().st_mtime_ns
    assert main([*trained, f"output.dir={tmp_path / 'third'}"]) == 0
    assert json.loads((tmp_path / "third" / "seed-0" / "teacher.json").read_text())["cached"]
    assert (entry / "README.md").stat().st_mtime_ns == before
