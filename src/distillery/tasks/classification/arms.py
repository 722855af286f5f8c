"""What each teacher source means for one arm of a run: the student module, its adapter, its teacher.

The training loop is the same for every source; only these three objects change:

=================  ==========================================  ===============================
source             student trained                             teacher
=================  ==========================================  ===============================
frozen             the student (DeiT: its two heads)            a trained network (or cache)
members            the student (DeiT: its two heads)            several trained networks combined
ema                the student                                 EMA of the student's weights
random             the student                                 frozen random copy of the student
past_predictions   the student                                 its own previous-epoch outputs
snapshot (gen k)   a fresh student                             generation k-1, frozen
peers              K students stacked ``[K, B, C]``            the other peers' mean
exits              the student with exit heads ``[E, B, C]``   its own deepest exit
(none)             the student                                 -- (e.g. label smoothing)
=================  ==========================================  ===============================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distillery.data import ClassificationData
from distillery.models import build_model
from distillery.models.adapters import ClassifierAdapter, StackedClassifierAdapter
from distillery.models.exits import MultiExit, MultiExitAdapter
from distillery.models.peers import PeerGroup
from distillery.models.vit import DeiTAdapter, ViTClassifier
from distillery.tasks.classification.config import ClassificationConfig
from distillery.teachers import FrozenTeacher
from distillery.teachers.ema import EMATeacher
from distillery.teachers.past_predictions import PastPredictionsTeacher
from distillery.teachers.stacked import DeepestExitTeacher, PeersTeacher
from distillery.train.config import TrainConfig


@dataclass
class ArmSetup:
    """The pieces of one distilled arm."""

    model: nn.Module  # what the loop trains
    adapter: ClassifierAdapter
    teacher: object | None
    export: Callable[[nn.Module], nn.Module]  # the plain student to save (peer 0, exits removed)
    members: list[str] | None = None  # names of the stacked outputs (exits, peers)
    main_member: int = 0  # which stacked output is "the student" in the report


def _identity(model: nn.Module) -> nn.Module:
    return model


def model_inputs(data: ClassificationData, key: str = "x") -> dict[str, int]:
    """What :func:`build_model` needs to know of text data for the model reading batch key ``key``
    (the tokenizer's size and padding id); empty for images and numbers."""
    text_inputs = getattr(data, "text_inputs", None)
    return {} if text_inputs is None else text_inputs(key)


def total_epochs(train_cfg: TrainConfig, num_examples: int) -> tuple[float, float]:
    """``(steps_per_epoch, epochs)`` of a training config over ``num_examples``."""
    steps_per_epoch = num_examples / train_cfg.batch_size
    return steps_per_epoch, train_cfg.total_steps(num_examples) / steps_per_epoch


def build_arm(
    cfg: ClassificationConfig,
    data: ClassificationData,
    seed: int,
    init_state: dict[str, torch.Tensor],
    train_cfg: TrainConfig,
    num_train: int,
    teacher: object | None = None,
    *,
    baseline: bool = False,
) -> ArmSetup:
    """The student, adapter and teacher of the distilled arm for ``cfg.teacher.source``.

    ``teacher`` is the already built teacher for the ``frozen``, ``members`` and ``snapshot`` sources
    (a trained network, several combined, or the previous generation); the other sources build theirs
    from the student. With
    ``baseline`` the arm is the plain student and no teacher (the cross-entropy control).
    """

    def student() -> nn.Module:
        return build_model(cfg.student, data.input_shape, data.num_classes, "student", **model_inputs(data))

    def initialised() -> nn.Module:
        model = student()
        model.load_state_dict(init_state)
        return model

    source = None if cfg.teacher is None else cfg.teacher.source
    plain = ClassifierAdapter()
    if baseline:
        model = initialised()
        if isinstance(model, ViTClassifier):  # no distillation head to average in: predict with [CLS]
            model.mean_heads.fill_(0.0)
        return ArmSetup(model, plain, None, _identity)
    if source in (None, "frozen", "cache", "snapshot", "members"):
        model = initialised()
        deit = isinstance(model, ViTClassifier) and model.distillation_token
        return ArmSetup(model, DeiTAdapter() if deit else plain, teacher, _identity)
    t = cfg.teacher
    if source == "ema":
        model = initialised()
        steps = train_cfg.total_steps(num_train)
        ema = EMATeacher(model, t.momentum, momentum_end=t.momentum_end, total_steps=steps, adapter=plain)
        return ArmSetup(model, plain, ema, _identity)
    if source == "random":
        torch.manual_seed(seed + t.init_seed_offset)
        return ArmSetup(initialised(), plain, FrozenTeacher(student(), plain), _identity)
    if source == "past_predictions":
        steps_per_epoch, epochs = total_epochs(train_cfg, num_train)
        num_ids = int(data.distillation_set().index.max()) + 1
        pskd = PastPredictionsTeacher(num_ids, data.num_classes, t.alpha_T, steps_per_epoch, epochs)
        return ArmSetup(initialised(), plain, pskd, _identity)
    if source == "peers":
        # peer 0 starts from the paired initial weights; the others from their own seeds
        group = PeerGroup(student, t.peers, seed=seed + 7919)
        group.members[0].load_state_dict(init_state)
        names = [f"peer {k + 1}" for k in range(t.peers)]
        return ArmSetup(
            group, StackedClassifierAdapter(t.peers), PeersTeacher(), lambda m: m.peer(0), names, 0
        )
    if source == "exits":
        example = data.labelled.x[:2]
        multi = MultiExit(initialised(), t.exits, example_input=example)
        names = multi.exit_names
        return ArmSetup(
            multi,
            MultiExitAdapter(multi.num_exits, hints=multi.hint_path is not None),
            DeepestExitTeacher(),
            lambda m: m.export(),
            names,
            len(names) - 1,
        )
    raise ValueError(f"unknown teacher source {source!r}")
