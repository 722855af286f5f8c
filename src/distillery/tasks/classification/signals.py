"""Representation terms in a classification arm: read the named layers of student and teacher, and
give the student the projectors its signals need.

The loss section names module paths (``features: {student: body.4, teacher: body.8}``); this module
checks them against the built models, measures the signals' shapes on an example batch, builds the
projectors (:func:`distillery.models.features.build_projector`) and wraps student and teacher in
:class:`~distillery.models.features.FeatureTap`. The exported student is the unwrapped one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distillery.capture import resolve_module
from distillery.errors import ConfigError
from distillery.losses import SignalPair
from distillery.models.ensemble import Ensemble
from distillery.models.features import (
    FeatureTap,
    TapAdapter,
    build_projector,
    describe_projector,
    signal_shapes,
)
from distillery.tasks.classification.arms import ArmSetup
from distillery.teachers import FrozenTeacher

PROJECTOR_SEED = 4099  # projectors are initialised from seed + this, apart from the student's weights


def teacher_network(module: nn.Module) -> nn.Module:
    """The network whose layers the teacher's paths name: a one-member ensemble's member."""
    if isinstance(module, Ensemble):
        if len(module.members) != 1:
            raise ConfigError(
                f"representation terms read one teacher network's layers, but the teacher is an ensemble of "
                f"{len(module.members)}; set teacher.ensemble=1 (or use logit terms with the ensemble)"
            )
        return module.members[0]
    return module


def _check_paths(model: nn.Module, pairs: list[SignalPair], side: str) -> None:
    for pair in pairs:
        path = pair.student if side == "student" else pair.teacher
        try:
            resolve_module(model, path)
        except ValueError as exc:
            label = pair.key.rsplit(".", 1)[0]
            raise ConfigError(f"loss.{label}.{side}: {exc}") from None


def _check_shapes(pair: SignalPair, s: tuple[int, ...], t: tuple[int, ...]) -> None:
    label = pair.key.rsplit(".", 1)[0]
    if pair.term == "attention_transfer" and (len(s) != 4 or len(t) != 4 or s[2:] != t[2:]):
        raise ConfigError(
            f"loss.{label}: attention transfer compares [B, C, H, W] maps of the same H x W, but the student "
            f"signal {pair.student!r} has shape {list(s)} and the teacher's {pair.teacher!r} {list(t)}; choose "
            "layers whose maps have the same spatial size"
        )


def tap_arm(
    setup: ArmSetup,
    teacher: nn.Module,
    pairs: list[SignalPair],
    batch: Mapping[str, Tensor],
    teacher_adapter: Any,
    seed: int,
) -> tuple[ArmSetup, dict[str, str]]:
    """``setup`` with student and teacher wrapped to output the signals of ``pairs``, and the
    projectors it built (feature name -> description, for the run log and ``result.json``).

    ``teacher`` is the teacher network (a one-member ensemble is looked through); ``batch`` an example
    batch of the training data (its student and teacher inputs give the shapes).
    """
    student, net = setup.model, teacher_network(teacher)
    _check_paths(student, pairs, "student")
    _check_paths(net, pairs, "teacher")
    s_shapes = signal_shapes(student, [p.student for p in pairs], batch[setup.adapter.input_key])
    t_shapes = signal_shapes(net, [p.teacher for p in pairs], batch[teacher_adapter.input_key])
    projectors: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + PROJECTOR_SEED)
        for pair in pairs:
            s, t = s_shapes[pair.student], t_shapes[pair.teacher]
            _check_shapes(pair, s, t)
            if pair.term == "features":
                proj = build_projector(pair.projector, s, t, f"loss.{pair.key.rsplit('.', 1)[0]}")
                if proj is not None:
                    projectors[pair.key] = proj
    tapped = FeatureTap(student, {p.key: p.student for p in pairs}, projectors)
    frozen = tapped_teacher(teacher, pairs, teacher_adapter)
    export = setup.export
    wrapped = ArmSetup(
        tapped,
        TapAdapter(setup.adapter),
        frozen,
        lambda m: export(m.model),
        setup.members,
        setup.main_member,
    )
    return wrapped, {key: describe_projector(module) for key, module in projectors.items()}


def tapped_teacher(teacher: nn.Module, pairs: list[SignalPair], teacher_adapter: Any) -> FrozenTeacher:
    """The frozen teacher network outputting its logits and the teacher signals of ``pairs`` (by key)."""
    net = teacher_network(teacher)
    return FrozenTeacher(FeatureTap(net, {p.key: p.teacher for p in pairs}), TapAdapter(teacher_adapter))


__all__ = ["PROJECTOR_SEED", "tap_arm", "tapped_teacher", "teacher_network"]
