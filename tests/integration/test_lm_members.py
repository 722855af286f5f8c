"""Several teacher LMs (teacher.members): a run end to end, the members' records, the errors."""

from __future__ import annotations

import json

import pytest

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import ConfigError

SMALL = ["train.steps=6", "train.eval_every=3", "data.arithmetic.train=120", "data.arithmetic.validation=10",
         "data.arithmetic.test=10", "--no-progress"]  # fmt: skip
MEMBERS = ("teacher={members: [{name: big, model: {hidden_size: 64, layers: 1, heads: 2}, train: {steps: 6, "
           "batch_size: 16}}, {name: small, model: {hidden_size: 32, layers: 1, heads: 2}, train: {steps: 4, "
           "batch_size: 16}}], combine: agreement, drop: 1}")  # fmt: skip


@pytest.mark.integration
def test_lm_members_combine_per_token_and_record_each_member(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", "lm-multi-teacher", MEMBERS, *SMALL, f"output.dir={out}"]) == 0
    teacher = json.loads((out / "seed-0" / "teacher.json").read_text())
    assert [m["name"] for m in teacher["members"]] == ["big", "small"]
    assert all("task_accuracy" in m["metrics"] for m in teacher["members"])  # each member generates
    record = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())["multi_teacher"]
    assert record["combine"] == "agreement" and 0.0 < record["kept_fraction"] <= 1.0
    # drop 1 of 2: every step exactly one member takes part
    assert record["members"]["big"]["dropped_steps"] + record["members"]["small"]["dropped_steps"] == 6


def test_the_recipe_reuses_lm_arithmetics_teacher_as_its_first_member():
    single, several = load_config("lm-arithmetic").teacher, load_config("lm-multi-teacher").teacher
    assert (several.members[0].model, several.members[0].train) == (single.model, single.train)


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.members=[{model: {vocab_size: 300}, train: {steps: 1}}, {model: {vocab_size: 400}, train: {steps: 1}}]",
         "outputs of different sizes"),
        ("method={name: sequence}", "method.name=sequence has the teacher generate"),
        ("teacher.combine=weighted", "needs teacher.weights"),
        ("teacher.members=[{model: {hidden_size: 32}}, {model: {hidden_size: 64}, train: {steps: 1}}]",
         "exactly one of train"),
    ],
)  # fmt: skip
def test_bad_member_sections_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("lm-multi-teacher", [override])
