"""Loss terms over representations: features, attention maps and relations between samples or tokens.

A representation term matches a *signal* of the student with a signal of the teacher: an
intermediate output named by module path (``body.3``, ``layer2.0``) for a classifier, or a named
output of a Hugging Face encoder (``hidden:3``, ``attention:-1``, ``q:2``, ``pooled``). ``student``
and ``teacher`` may be lists of the same length: the term is then the sum over the pairs (as
attention transfer sums over its groups of layers). The task reads the signals (by forward hooks:
the model is not rewritten) and hands them to the term as ``inputs.student_features[f"{label}.{i}"]``
and ``inputs.teacher_features[f"{label}.{i}"]``, where ``label`` is the term's name in the ``loss``
section and ``i`` the pair; token-level signals come with ``features["token_mask"]`` ``[B, L]``.

Normalisation: each term's value on a micro-batch is its mean over that micro-batch (rows, tokens or
pairs of samples, as the function defines it), scaled by ``local rows / global rows`` so that gradient
accumulation and data parallelism average the micro-batch values weighted by their rows. For
per-row features this is exactly the mean over the global batch; for relations between samples it
is the row-weighted mean of the per-micro-batch relation losses (relations across micro-batches are
not formed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distillery import functional as DF
from distillery.losses.base import LossInputs, LossTerm, TermConfig
from distillery.models.features import TOKEN_MASK  # the [B, L] mask of real (non-padding) tokens

Projector = Literal["auto", "none", "linear", "conv1x1", "mlp"]


class SignalTermConfig(TermConfig):
    """Fields of every representation term: which signal of the student matches which of the teacher."""

    student: str | list[str] = Field(
        description="the student's signal: a module path (classifiers: e.g. body.6), or an encoder signal "
        "(hidden:<layer>, attention:<layer>, scores:<layer>, q:<layer>, k:<layer>, v:<layer>, pooled); a list "
        "pairs with teacher's list"
    )
    teacher: str | list[str] = Field(description="the teacher's signal(s), in the same form as `student`")

    @model_validator(mode="after")
    def _paired(self) -> SignalTermConfig:
        s, t = self.student_signals(), self.teacher_signals()
        if not s or len(s) != len(t):
            raise ValueError(
                f"conflicting fields: student names {len(s)} signal(s) and teacher {len(t)}; give one teacher "
                "signal per student signal"
            )
        return self

    def student_signals(self) -> list[str]:
        return [self.student] if isinstance(self.student, str) else list(self.student)

    def teacher_signals(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def hyperparameters(self) -> dict:
        return self.model_dump(
            exclude={
                "name",
                "weight",
                "warmup_epochs",
                "from_epoch",
                "until_epoch",
                "student",
                "teacher",
                "projector",
            }
        )


@dataclass(frozen=True)
class SignalPair:
    """One pair of signals a term matches: the feature name it reaches the term under, the student's
    and the teacher's signal, and the projector asked for (``none`` for terms that compare shapes of
    any width)."""

    key: str
    student: str
    teacher: str
    term: str
    projector: str = "none"


def signal_pairs(loss: Mapping[str, TermConfig]) -> list[SignalPair]:
    """Every signal pair the representation terms of a ``loss`` section need, in order."""
    pairs = []
    for label, cfg in loss.items():
        if not isinstance(cfg, SignalTermConfig):
            continue
        projector = getattr(cfg, "projector", "none")
        for i, (s, t) in enumerate(zip(cfg.student_signals(), cfg.teacher_signals())):
            pairs.append(SignalPair(f"{label}.{i}", s, t, cfg.name, projector))
    return pairs


class SignalTerm(LossTerm):
    """Base of the representation terms: finds its signal pairs and normalises by rows (module doc)."""

    token_level: ClassVar[bool] = False  # the signals are [B, L, ...] over tokens, with a token mask

    def __init__(self, label: str = "", pairs: int = 1) -> None:
        super().__init__()
        self.label, self.pairs = label, pairs

    def pair_values(self, inputs: LossInputs) -> list[tuple[Tensor, Tensor]]:
        out = []
        for i in range(self.pairs):
            key = f"{self.label}.{i}"
            missing = [
                side
                for side, feats in (
                    ("student", inputs.student_features),
                    ("teacher", inputs.teacher_features),
                )
                if key not in feats
            ]
            if missing:
                raise ValueError(
                    f"loss term {self.label!r} needs signal pair {i} ({key}) from the {' and the '.join(missing)}, "
                    "which did not output it; representation terms need a task that reads signals "
                    "(classification with a frozen or snapshot teacher, or the encoder task)"
                )
            out.append((inputs.student_features[key], inputs.teacher_features[key]))
        return out

    def token_mask(self, inputs: LossInputs, signal: Tensor) -> Tensor | None:
        mask = inputs.student_features.get(TOKEN_MASK)
        return None if mask is None else mask.to(device=signal.device, dtype=torch.bool)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        rows = inputs.mask
        values = [self.value(s, t.detach(), inputs, rows) for s, t in self.pair_values(inputs)]
        local = torch.stack(values).sum()
        return self._local_share(local, rows, num_valid)

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        """The term on one pair of signals of this micro-batch (its local mean)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"label={self.label!r}, pairs={self.pairs}"


def _per_sample(x: Tensor, rows: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[B', F]``: each sample's signal as one vector, the valid rows only."""
    return x.reshape(x.shape[0], -1)[rows.reshape(-1).to(torch.bool)]


# ---- features ---------------------------------------------------------------------------------------


class FeaturesConfig(SignalTermConfig):
    """Student features regress onto the teacher's (FitNets hints), through a projector when their
    shapes differ: mean squared error, smooth L1 or cosine distance."""

    name: Literal["features"] = "features"
    kind: Literal["mse", "smooth_l1", "cosine"] = Field("mse", description="distance between the features")
    beta: float = Field(1.0, gt=0.0, description="smooth_l1: where the loss turns from quadratic to linear")
    projector: Projector = Field(
        "auto",
        description="maps the student's signal to the teacher's shape, trained with the student and not "
        "exported: auto (linear for [B, F], 1x1 conv for [B, C, H, W] maps, only when shapes differ), "
        "linear, conv1x1, mlp, or none (then shapes must match)",
    )


class FeaturesLoss(SignalTerm):
    """:func:`distillery.functional.feature_distance` per row (a sample, or a real token): a ``[B, C, H,
    W]`` map is one row of ``C*H*W`` values; token signals ``[B, L, H]`` have one row per real token."""

    def __init__(self, label: str = "", pairs: int = 1, kind: str = "mse", beta: float = 1.0) -> None:
        super().__init__(label, pairs)
        self.kind, self.beta = kind, beta

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"loss term {self.label!r}: student signal {tuple(student.shape)} and teacher signal "
                f"{tuple(teacher.shape)} differ; set projector: auto (or linear / conv1x1 / mlp)"
            )
        tokens = self.token_mask(inputs, student)
        if tokens is not None and student.dim() == 3 and tokens.shape == student.shape[:2]:
            mask = tokens & rows.reshape(-1, 1).to(torch.bool)
            return DF.feature_distance(student, teacher, kind=self.kind, beta=self.beta, mask=mask)
        s, t = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
        return DF.feature_distance(s, t, kind=self.kind, beta=self.beta, mask=rows.reshape(-1).to(torch.bool))


# ---- attention transfer (CNN feature maps) -----------------------------------------------------------


class AttentionTransferConfig(SignalTermConfig):
    """Attention transfer: the student's spatial attention maps (channel-pooled |activation|^p,
    L2-normalised) match the teacher's, summed over the pairs of layers (Zagoruyko & Komodakis)."""

    name: Literal["attention_transfer"] = "attention_transfer"
    p: float = Field(2.0, gt=0.0, description="exponent of the activations in the attention map")


class AttentionTransferLoss(SignalTerm):
    """:func:`distillery.functional.attention_transfer` on ``[B, C, H, W]`` maps (channels may differ)."""

    def __init__(self, label: str = "", pairs: int = 1, p: float = 2.0) -> None:
        super().__init__(label, pairs)
        self.p = p

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        keep = rows.reshape(-1).to(torch.bool)
        return DF.attention_transfer(student[keep], teacher[keep], p=self.p)


# ---- relations between samples -----------------------------------------------------------------------


class _RelationLoss(SignalTerm):
    """A relation between the samples of the micro-batch, on their flattened signals ``[B, F]``."""

    function: ClassVar[Callable[..., Tensor]]

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        return type(self).function(_per_sample(student, rows), _per_sample(teacher, rows))


class RKDDistanceConfig(SignalTermConfig):
    """RKD distance: pairwise distances between the batch's samples, each side normalised by its mean
    distance, matched with a smooth L1 loss (Park et al.)."""

    name: Literal["rkd_distance"] = "rkd_distance"


class RKDDistanceLoss(_RelationLoss):
    """:func:`distillery.functional.rkd_distance` between the flattened signals of the micro-batch."""

    function = staticmethod(lambda s, t: DF.rkd_distance(s, t))


class RKDAngleConfig(SignalTermConfig):
    """RKD angle: the angles formed by every triple of the batch's samples, matched with a smooth L1
    loss (Park et al.)."""

    name: Literal["rkd_angle"] = "rkd_angle"


class RKDAngleLoss(_RelationLoss):
    """:func:`distillery.functional.rkd_angle` between the flattened signals of the micro-batch."""

    function = staticmethod(lambda s, t: DF.rkd_angle(s, t))


class SimilarityPreservingConfig(SignalTermConfig):
    """Similarity-preserving KD: the batch's row-normalised Gram matrices of student and teacher
    signals match (Tung & Mori)."""

    name: Literal["sp"] = "sp"


class SimilarityPreservingLoss(_RelationLoss):
    """:func:`distillery.functional.similarity_preserving` between the flattened signals."""

    function = staticmethod(lambda s, t: DF.similarity_preserving(s, t))


class CKAConfig(SignalTermConfig):
    """1 - linear CKA between the batch's student and teacher signals (Kornblith et al.)."""

    name: Literal["cka"] = "cka"


class CKALoss(_RelationLoss):
    """:func:`distillery.functional.linear_cka_loss` between the flattened signals."""

    function = staticmethod(lambda s, t: DF.linear_cka_loss(s, t))


# ---- attention and relations between tokens (transformers) -------------------------------------------


class AttentionKLConfig(SignalTermConfig):
    """MiniLM: KL(teacher || student) between self-attention distributions ``attention:<layer>``
    (the same number of heads on both sides), padding masked."""

    name: Literal["attention_kl"] = "attention_kl"


class AttentionKLLoss(SignalTerm):
    """:func:`distillery.functional.attention_kl` on ``[B, A, L, L]`` attention probabilities."""

    token_level = True

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        return DF.attention_kl(student, teacher, mask=self.token_mask(inputs, student))


class RelationKLConfig(SignalTermConfig):
    """MiniLMv2: KL between self-relations softmax(X X^T / sqrt(d_r)) of queries, keys or values (``q:k``,
    ``k:k``, ``v:k``) split into relation heads whose number is independent of the models' heads; with
    ``v`` signals and heads = the model's heads it is MiniLM's value relation. Summed over the pairs."""

    name: Literal["relation_kl"] = "relation_kl"
    heads: int = Field(ge=1, description="relation heads (each side's width must be divisible by it)")


class RelationKLLoss(SignalTerm):
    """:func:`distillery.functional.self_relation_kl` on ``[B, L, D]`` signals (D may differ)."""

    token_level = True

    def __init__(self, label: str = "", pairs: int = 1, heads: int = 1) -> None:
        super().__init__(label, pairs)
        self.heads = heads

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        return DF.self_relation_kl(
            student, teacher, num_relation_heads=self.heads, mask=self.token_mask(inputs, student)
        )


class AttentionScoresConfig(SignalTermConfig):
    """TinyBERT: mean squared error between unnormalised attention scores ``scores:<layer>``, over
    real (query, key) token pairs."""

    name: Literal["attention_scores"] = "attention_scores"


class AttentionScoresLoss(SignalTerm):
    """:func:`distillery.functional.attention_score_mse` on ``[B, A, L, L]`` attention scores."""

    token_level = True

    def value(self, student: Tensor, teacher: Tensor, inputs: LossInputs, rows: Tensor) -> Tensor:
        return DF.attention_score_mse(student, teacher, mask=self.token_mask(inputs, student))


# name -> (config, term); joined into distillery.losses.LOSSES
REPRESENTATION_LOSSES: dict[str, tuple[type[SignalTermConfig], type[SignalTerm]]] = {
    "features": (FeaturesConfig, FeaturesLoss),
    "attention_transfer": (AttentionTransferConfig, AttentionTransferLoss),
    "rkd_distance": (RKDDistanceConfig, RKDDistanceLoss),
    "rkd_angle": (RKDAngleConfig, RKDAngleLoss),
    "sp": (SimilarityPreservingConfig, SimilarityPreservingLoss),
    "cka": (CKAConfig, CKALoss),
    "attention_kl": (AttentionKLConfig, AttentionKLLoss),
    "relation_kl": (RelationKLConfig, RelationKLLoss),
    "attention_scores": (AttentionScoresConfig, AttentionScoresLoss),
}

__all__ = [
    "REPRESENTATION_LOSSES",
    "TOKEN_MASK",
    "SignalPair",
    "SignalTerm",
    "SignalTermConfig",
    "signal_pairs",
]
