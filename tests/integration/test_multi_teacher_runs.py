"""Several teachers end to end on digits: members trained and cached one by one, each member's test
numbers in teacher.json, each member's contribution in the arm's result and training log."""

import json

import pytest

from distillery.config import load_config
from distillery.experiment import run
from distillery.experiment.evaluate import evaluate_run
from distillery.train.logging import read_metrics

pytestmark = pytest.mark.integration

# the recipe's three members and student, at a few steps each, on a small split; one seed, no baseline
TINY = [
    "seeds=[0]",
    "data={name: digits, validation: 0, labelled: 80, transfer: 40, test: 60}",
    "teacher.members.0.train.steps=8",
    "teacher.members.1.train.steps=4",
    "teacher.members.2.train.steps=2",
    "train.steps=6",
    "train.batch_size=16",
    "train.eval_every=0",
    "train.log_every=3",
    "baseline.enabled=false",
]
NAMES = ["wide", "medium", "weak"]


def _json(path):
    return json.loads(path.read_text())


def test_members_are_cached_one_by_one_and_each_contribution_is_recorded(tmp_path, capsys):
    agree = load_config(
        "digits-multi-teacher",
        [*TINY, "teacher.combine=agreement", "teacher.drop=1", f"output.dir={tmp_path / 'a'}"],
    )
    result = run(agree, progress=False)
    out = capsys.readouterr().out
    info = _json(tmp_path / "a" / "seed-0" / "teacher.json")
    assert info["source"] == "members" and [m["name"] for m in info["members"]] == NAMES
    assert all(not m["cached"] and 0 <= m["metrics"]["accuracy"] <= 100 for m in info["members"])
    assert info["params"] == sum(m["params"] for m in info["members"])
    for name in NAMES:
        assert f"seed 0 teacher {name}: accuracy" in out
    record = _json(tmp_path / "a" / "seed-0" / "distilled" / "result.json")
    multi = record["multi_teacher"]
    assert multi["combine"] == "agreement" and multi["drop"] == 1 and multi["steps"] == 6
    assert 0.0 <= multi["kept_fraction"] <= 1.0 and multi["rows"] == 6 * 16
    members = multi["members"]
    assert list(members) == NAMES
    assert sum(m["mean_weight"] for m in members.values()) == pytest.approx(1.0)
    assert sum(m["dropped_steps"] for m in members.values()) == 6  # one member left out of every step
    assert "teachers combined by agreement, rows kept" in out and "dropped from" in out
    logged = read_metrics(tmp_path / "a" / "seed-0" / "distilled", "teacher")
    assert [r["step"] for r in logged] == [3, 6] and logged[-1]["kept_fraction"] == multi["kept_fraction"]
    assert result.summary["models"]["distilled"]["label"] == "student multi-teacher KD"

    # another rule over the same members: every member comes from the cache
    label = load_config(
        "digits-multi-teacher",
        [*TINY, "teacher.confidence=label", "teacher.temperature=0.5", f"output.dir={tmp_path / 'b'}"],
    )
    run(label, progress=False)
    info = _json(tmp_path / "b" / "seed-0" / "teacher.json")
    assert [m["cached"] for m in info["members"]] == [True, True, True]
    multi = _json(tmp_path / "b" / "seed-0" / "distilled" / "result.json")["multi_teacher"]
    assert (
        multi["combine"] == "confidence" and multi["confidence"] == "label" and multi["kept_fraction"] == 1.0
    )
    weights = [m["mean_weight"] for m in multi["members"].values()]
    assert sum(weights) == pytest.approx(1.0) and len(set(weights)) == 3  # per-row weights, not uniform

    # a member's section as the only teacher of a run is the same cache entry
    wide = label.teacher.members[0].model_dump(mode="json", exclude={"name"})
    single = load_config(
        "digits-kd",
        [
            *TINY[:2],
            "teacher=" + json.dumps(wide),
            "train.steps=2",
            "baseline.enabled=false",
            f"output.dir={tmp_path / 'c'}",
        ],
    )
    run(single, progress=False)
    assert _json(tmp_path / "c" / "seed-0" / "teacher.json")["cached"] is True

    # distillery eval brings the members back from the cache and combines them again
    again = evaluate_run(tmp_path / "a")
    assert again.teachers[0]["metrics"] == pytest.approx(result.teachers[0]["metrics"])
    assert again.arms["distilled"][0]["metrics"] == pytest.approx(result.arms["distilled"][0]["metrics"])
