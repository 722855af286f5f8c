"""Loss terms: thin modules over :mod:`distillery.functional`, named in YAML by short names.

:data:`LOSSES` is the explicit table of names; an unknown name is an error listing the valid ones.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Annotated

from pydantic import Field

from distillery.losses.base import IGNORE_INDEX, LossInputs, LossTerm, TermConfig
from distillery.losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES
from distillery.losses.features import HintConfig, HintLoss
from distillery.losses.logit import (
    CrossEntropyConfig,
    CrossEntropyLoss,
    DKDConfig,
    DKDLoss,
    ForwardKLConfig,
    ForwardKLLoss,
    ImportanceReverseKLConfig,
    ImportanceReverseKLLoss,
    JSDConfig,
    JSDLoss,
    KDConfig,
    KDLoss,
    NKDConfig,
    NKDLoss,
    ReverseKLConfig,
    ReverseKLLoss,
    SkewKLConfig,
    SkewKLLoss,
    SkewReverseKLConfig,
    SkewReverseKLLoss,
    TVDConfig,
    TVDLoss,
    USKDConfig,
    USKDLoss,
)
from distillery.losses.objective import Objective
from distillery.losses.representation import (
    REPRESENTATION_LOSSES,
    AttentionKLLoss,
    AttentionScoresLoss,
    AttentionTransferLoss,
    CKALoss,
    FeaturesLoss,
    RelationKLLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SignalPair,
    SignalTerm,
    SignalTermConfig,
    SimilarityPreservingLoss,
    signal_pairs,
)
from distillery.losses.self_supervised import (
    SELF_SUPERVISED_LOSSES,
    BYOLLoss,
    Data2VecLoss,
    DINOLoss,
    IBOTLoss,
    KoLeoLoss,
    SelfSupervisedTermConfig,
)
from distillery.losses.semi_supervised import DEIT_DIST, SEMI_SUPERVISED_LOSSES

# short name -> (config model, module class)
LOSSES: dict[str, tuple[type[TermConfig], type[LossTerm]]] = {
    "ce": (CrossEntropyConfig, CrossEntropyLoss),
    "forward_kl": (ForwardKLConfig, ForwardKLLoss),
    "kd": (KDConfig, KDLoss),
    "reverse_kl": (ReverseKLConfig, ReverseKLLoss),
    "jsd": (JSDConfig, JSDLoss),
    "importance_reverse_kl": (ImportanceReverseKLConfig, ImportanceReverseKLLoss),
    "tvd": (TVDConfig, TVDLoss),
    "skew_kl": (SkewKLConfig, SkewKLLoss),
    "skew_reverse_kl": (SkewReverseKLConfig, SkewReverseKLLoss),
    "dkd": (DKDConfig, DKDLoss),
    "nkd": (NKDConfig, NKDLoss),
    "uskd": (USKDConfig, USKDLoss),
    "hint": (HintConfig, HintLoss),
    **REPRESENTATION_LOSSES,
    **SELF_SUPERVISED_LOSSES,
    **SEMI_SUPERVISED_LOSSES,
    **CROSS_TOKENIZER_LOSSES,
}

# The union of every term config, told apart by its `name` field.
LossTermConfig = Annotated[
    functools.reduce(operator.or_, [cfg for cfg, _ in LOSSES.values()]), Field(discriminator="name")
]


def build_loss(cfg: TermConfig, label: str | None = None) -> LossTerm:
    """The module for one configured term (``label``: its name in the ``loss`` section, under which a
    representation term finds its signals; default: the term's name)."""
    _, cls = LOSSES[cfg.name]
    if isinstance(cfg, SignalTermConfig):
        pairs = len(cfg.student_signals())
        return cls(label=label or cfg.name, pairs=pairs, **cfg.hyperparameters())
    return cls(**cfg.hyperparameters())


def build_objective(terms: Mapping[str, TermConfig]) -> Objective:
    """An :class:`Objective` from ``{label: term config}`` (the ``loss`` section of a run config)."""
    return Objective(
        {label: build_loss(cfg, label) for label, cfg in terms.items()},
        weights={label: cfg.weight for label, cfg in terms.items()},
        warmup_epochs={label: cfg.warmup_epochs for label, cfg in terms.items()},
        windows={label: (cfg.from_epoch, cfg.until_epoch) for label, cfg in terms.items()},
    )


__all__ = [
    "DEIT_DIST",
    "IGNORE_INDEX",
    "LOSSES",
    "AttentionKLLoss",
    "AttentionScoresLoss",
    "AttentionTransferLoss",
    "BYOLLoss",
    "CKALoss",
    "CrossEntropyLoss",
    "DINOLoss",
    "DKDLoss",
    "Data2VecLoss",
    "FeaturesLoss",
    "ForwardKLLoss",
    "HintLoss",
    "IBOTLoss",
    "JSDLoss",
    "KDLoss",
    "KoLeoLoss",
    "LossInputs",
    "LossTerm",
    "LossTermConfig",
    "NKDLoss",
    "Objective",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "RelationKLLoss",
    "ReverseKLLoss",
    "SelfSupervisedTermConfig",
    "SignalPair",
    "SignalTerm",
    "SignalTermConfig",
    "SimilarityPreservingLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "TermConfig",
    "USKDLoss",
    "build_loss",
    "build_objective",
    "signal_pairs",
]
