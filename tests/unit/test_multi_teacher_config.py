"""The `teacher.members` section: its YAML shape, and every mistake named with its field and fix."""

import pytest

from distillery.config import load_config, read_recipe, validate_config
from distillery.errors import ConfigError
from distillery.recipes import resolve_recipe

A = "{model: {name: mlp, hidden: [8]}, train: {steps: 2}}"
B = "{model: {name: mlp, hidden: [16]}, train: {steps: 2}}"
C = "{model: {name: mlp, hidden: [32]}, train: {steps: 2}}"


def _cfg(*overrides):
    return load_config("digits-kd", [f"teacher={{members: [{A}, {B}, {C}]}}", *overrides])


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    return str(info.value)


def test_members_imply_the_source_and_take_the_defaults():
    cfg = _cfg()
    t = cfg.teacher
    assert t.source == "members" and t.combine == "mean" and t.drop == 0 and t.weights is None
    assert t.member_names() == ["member 1", "member 2", "member 3"]
    assert [m.source for m in t.members] == ["frozen"] * 3
    explicit = _cfg("teacher.source=members", f"teacher.members=[{A}, {B}]", "teacher.combine=confidence")
    assert explicit.teacher.confidence is None and len(explicit.teacher.members) == 2
    weighted = _cfg("teacher.combine=weighted", "teacher.weights=[2, 1, 1]", "teacher.drop=0.25")
    assert weighted.teacher.weights == [2.0, 1.0, 1.0] and weighted.teacher.drop == 0.25
    assert _cfg("teacher.drop=2").teacher.drop == 2 and isinstance(_cfg("teacher.drop=2").teacher.drop, int)
    # a derived recipe whose teacher lists members replaces the base's single teacher
    data = read_recipe(resolve_recipe("digits-multi-teacher"))
    assert "model" not in data["teacher"] and validate_config(data).teacher.source == "members"


@pytest.mark.parametrize(
    "overrides,phrase",
    [
        ((f"teacher.members=[{A}]",), "teacher.members has 1 member(s); several teachers need at least 2"),
        (("teacher.weights=[1, 1, 1]",), "teacher.weights are the fixed weights of teacher.combine=weighted"),
        (("teacher.combine=weighted",), "teacher.combine=weighted needs teacher.weights"),
        (
            ("teacher.combine=weighted", "teacher.weights=[1, 2]"),
            "teacher.weights has 2 entries for 3 members",
        ),
        (("teacher.combine=weighted", "teacher.weights=[1, -2, 1]"), "must be finite and >= 0"),
        (("teacher.combine=weighted", "teacher.weights=[0, 0, 0]"), "not all 0"),
        (("teacher.confidence=label",), "teacher.confidence is a setting of teacher.combine=confidence"),
        (("teacher.temperature=2",), "teacher.temperature is a setting of teacher.combine=confidence"),
        (("teacher.combine=confidence", "teacher.confidence=margin"), "teacher.confidence"),
        (("teacher.combine=median",), "teacher.combine"),
        (("teacher.drop=3",), "teacher.drop=3 members per step of 3"),
        (("teacher.drop=1.5",), "teacher.drop=1.5: a probability"),
        (("teacher.drop=true",), "drop: expected int | float, got the boolean true"),
        ((f"teacher.members=[{A}, {A}]",), "teacher.members.0 and teacher.members.1 are the same teacher"),
        (
            ("teacher.members.0.name=x", "teacher.members.1.name=x"),
            "the name 'x' is given to several members",
        ),
        (("teacher.members.1.precompute=true",), "set teacher.precompute"),
        (("teacher.members.1.train=null",), "teacher.members.1"),
        (("teacher.members.0.source=cache",), "teacher.members.0.source"),
        (("teacher.combine=agreement", "loss.deit={weight: 0.5}"), "loss.deit (deit) cannot weight its rows"),
        (
            ("loss.at={name: attention_transfer, student: body.1, teacher: body.1}",),
            "teacher.members gives several",
        ),
        (("teacher.precompute=true", "train.augment.shift=1"), "teacher.precompute=true"),
    ],
)
def test_mistakes_name_the_field_and_the_fix(overrides, phrase):
    assert phrase in _error(*overrides)
