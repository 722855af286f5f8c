"""Pinned short trajectories of the main job (digits-kd) and lm-kd in a reduced setting.

Each test runs a recipe through the CLI (one thread, a private teacher cache) and compares the
logged training losses of every arm and the final metrics with numbers pinned here, to 1e-6. A
change that is not meant to alter training (a restructuring, a refactor) must keep them; a change
that is meant to alter training regenerates them and says so in its commit:

    DISTILLERY_REPIN=1 python -m pytest tests/integration/test_pinned_trajectories.py -s

prints the current values in the form of the tables below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distillery.cli import main

DIGITS = [
    "seeds=[0]",
    "teacher.ensemble=1",
    "teacher.train.steps=200",
    "train.steps=40",
    "train.log_every=8",
    "train.eval_every=0",
    "--no-progress",
]
LM = [
    "teacher.train.steps=60",
    "train.steps=20",
    "train.log_every=5",
    "train.eval_every=0",
    "data.max_train_blocks=48",
    "data.max_eval_blocks=8",
    "data.seq_len=32",
    "data.tokenizer.vocab_size=300",
    "--no-progress",
]

# arm -> logged training losses (every train.log_every steps); arm -> final metrics
DIGITS_LOSSES = {
    "baseline": [2.216085433959961, 2.157804489135742, 2.0911333560943604, 2.0751852989196777, 2.107038736343384],
    "distilled": [1.668318510055542, 1.3950643241405487, 1.2188918888568878, 1.1411298513412476, 1.0597004294395447],
}  # fmt: skip
DIGITS_METRICS = {
    "baseline": {"accuracy": 62.77666091918945, "nll": 2.0825912952423096, "ece": 49.776890873909, "agreement": 59.95975732803345},
    "distilled": {"accuracy": 81.08651638031006, "nll": 1.5177254676818848, "ece": 57.22373127937317, "agreement": 73.03823232650757},
}  # fmt: skip
DIGITS_TEACHER = {"accuracy": 73.84305596351624}
LM_LOSSES = {
    "baseline": [4.972410678863525, 4.420457363128662, 4.207110404968262, 4.169722557067871],
    "distilled": [2.9777747690677643, 2.4700635373592377, 2.3275134712457657, 2.3053702116012573],
}  # fmt: skip
LM_METRICS = {
    "baseline": {"nll": 4.40217541110131, "perplexity": 81.62825065829823, "agreement": 28.629032258064516},
    "distilled": {"nll": 4.396986438382056, "perplexity": 81.20578093238457, "agreement": 18.548387096774192},
}  # fmt: skip
LM_TEACHER = {"perplexity": 73.60739028741047}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trajectory(arm_dir: Path) -> tuple[list[float], dict[str, float]]:
    records = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    metrics = json.loads((arm_dir / "result.json").read_text())["metrics"]
    return losses, metrics


def _check(run_dir: Path, losses: dict, metrics: dict, teacher: dict, name: str) -> None:
    got_losses, got_metrics = {}, {}
    for arm in losses:
        got_losses[arm], final = _trajectory(run_dir / "seed-0" / arm)
        got_metrics[arm] = {k: final[k] for k in metrics[arm]}
    got_teacher = json.loads((run_dir / "seed-0" / "teacher.json").read_text())["metrics"]
    got_teacher = {k: got_teacher[k] for k in teacher}
    if os.environ.get("DISTILLERY_REPIN"):
        print(f"\n{name}_LOSSES = {json.dumps(got_losses)}")
        print(f"{name}_METRICS = {json.dumps(got_metrics)}")
        print(f"{name}_TEACHER = {json.dumps(got_teacher)}")
    for arm in losses:
        assert got_losses[arm] == pytest.approx(losses[arm], rel=1e-6, abs=1e-6), arm
        for key, value in metrics[arm].items():
            assert got_metrics[arm][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (arm, key)
    for key, value in teacher.items():
        assert got_teacher[key] == pytest.approx(value, rel=1e-6, abs=1e-6), ("teacher", key)


@pytest.mark.integration
def test_digits_kd_trajectory_is_pinned(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main(["run", "digits-kd", *DIGITS, f"output.dir={run_dir}"]) == 0
    _check(run_dir, DIGITS_LOSSES, DIGITS_METRICS, DIGITS_TEACHER, "DIGITS")


@pytest.mark.integration
def test_lm_kd_trajectory_is_pinned(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main(["run", "lm-kd", *LM, f"output.dir={run_dir}"]) == 0
    _check(run_dir, LM_LOSSES, LM_METRICS, LM_TEACHER, "LM")
