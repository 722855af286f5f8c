"""What every loss term sees, and the contract a term implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distillery import functional as DF
from distillery.configbase import StrictModel
from distillery.functional.paced import weighted_row_mean
from distillery.models.adapters import (
    LM_HEAD_BIAS,
    LM_HEAD_WEIGHT,
    LM_HIDDEN,
    TEACHER_IDS,
    TEACHER_LOGP,
    TEACHER_TAIL,
    TEACHER_WEIGHTS,
)

IGNORE_INDEX = -100


@dataclass
class LossInputs:
    """Aligned student/teacher outputs of one micro-batch.

    ``student_logits``/``teacher_logits`` are ``[..., C]``; ``target`` and ``mask`` are ``[...]``
    (``target`` is -100 on rows without a label; ``mask`` is False on rows that do not exist, such as
    padding). ``epoch`` is the fractional epoch, for terms with a schedule.

    ``row_weight`` (optional) scales each row's contribution: ``[...]`` like ``mask``, or a prefix of
    that shape (one weight per sequence ``[B]`` for token rows ``[B, T-1]``), repeated over the trailing
    dims. A term given weights returns ``sum_i w_i * loss_i / num_valid`` over its rows: the normaliser
    stays the (global) number of rows the term averages over, not the sum of the weights (PACED's
    pass-rate weights, :func:`distillery.functional.paced.paced_weights`). A teacher's own row weights
    (the feature ``TEACHER_ROW_WEIGHT`` of its output) are multiplied in by the objective, for the
    terms that use the teacher only.
    """

    student_logits: Tensor | None  # None: computed chunk by chunk from student_features (chunked loss)
    target: Tensor
    mask: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    epoch: float = 0.0
    row_weight: Tensor | None = None


class LossTerm(nn.Module):
    """One term of a training objective.

    A term declares which rows it averages over (:meth:`rows`), so the training loop can count them
    across gradient-accumulation steps and data-parallel ranks before any forward pass, and then
    computes the sum over its rows divided by that global count (:meth:`forward`). A term whose parts
    average over different rows (kd: KL over the valid rows, cross-entropy over the labelled ones)
    declares several counts (:attr:`num_counts`, :meth:`counts`) and gets them all. The maths lives in
    :mod:`distillery.functional`; a term only picks the inputs and holds hyperparameters.

    Terms with ``supports_row_weight`` honour :attr:`LossInputs.row_weight`; the objective refuses
    weights for any other term rather than silently ignoring them.
    """

    needs_teacher: ClassVar[bool] = True
    supports_row_weight: ClassVar[bool] = False
    # How many row counts normalise the term (see :meth:`counts`): one for most terms; kd has two,
    # its valid rows (KL part) and its labelled rows (cross-entropy part).
    num_counts: ClassVar[int] = 1
    # Terms that can also be computed from hidden states and LM heads, chunk by chunk over the
    # tokens, when the outputs carry no logits (see ``LM_HIDDEN``); ``chunk_size`` tokens per chunk.
    supports_hidden: ClassVar[bool] = False
    chunk_size: int = 256
    # The divergence this term computes from a sparse teacher (a top-k or sampled cache: the features
    # TEACHER_IDS, ...), see :meth:`_sparse_teacher`; None: the term needs the teacher's full logits.
    sparse_name: ClassVar[str | None] = None

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        """Boolean ``[...]``: the rows this term averages over (default: every valid row)."""
        return mask

    def counts(self, target: Tensor, mask: Tensor) -> Tensor:
        """float64 counts of this micro-batch's rows that normalise the term, in the form
        :meth:`forward` takes as ``num_valid``: a 0-d tensor (the number of :meth:`rows`) when
        ``num_counts == 1``, else a ``[num_counts]`` vector. The objective sums them over the
        micro-batches of a step and over the processes, and passes the sums to :meth:`forward`."""
        return self.rows(target, mask).sum().to(torch.float64)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        raise NotImplementedError

    def _from_hidden(self, inputs: LossInputs, teacher: bool) -> dict[str, Tensor | None]:
        """Keyword arguments of the chunked functions when the outputs carry hidden states, not logits."""
        if not self.supports_hidden:
            raise ValueError(
                f"loss term {type(self).__name__} needs logits, but the model returned hidden states for a "
                "chunked loss; turn chunked_loss off or use terms that support it (ce, forward_kl, reverse_kl, "
                "jsd, tvd, skew_kl, skew_reverse_kl)"
            )
        if inputs.row_weight is not None:
            raise ValueError(
                "per-row weights (PACED) cannot be combined with the chunked loss; turn chunked_loss off"
            )
        sides = [("student", inputs.student_features)] + (
            [("teacher", inputs.teacher_features)] if teacher else []
        )
        out: dict[str, Tensor | None] = {}
        for side, features in sides:
            if LM_HIDDEN not in features or LM_HEAD_WEIGHT not in features:
                raise ValueError(
                    f"loss term {type(self).__name__}: the {side} output has neither logits nor the hidden "
                    f"states and LM head of a chunked loss ({LM_HIDDEN}, {LM_HEAD_WEIGHT})"
                )
            out[f"{side}_hidden"] = features[LM_HIDDEN]
            out[f"{side}_head_weight"] = features[LM_HEAD_WEIGHT]
            out[f"{side}_head_bias"] = features.get(LM_HEAD_BIAS)
        return out

    def _sparse_teacher(
        self, inputs: LossInputs, num_valid: Tensor | float | None, temperature: float, **kwargs: float
    ) -> Tensor | None:
        """The term computed from a sparse teacher, or None when the teacher gave its full logits.

        A top-k cache (``TEACHER_TAIL`` present) gives :func:`~distillery.functional.topk_tail_divergence`,
        a sampled one :func:`~distillery.functional.sampled_forward_kl`; from hidden states (a chunked
        loss) :func:`~distillery.functional.chunked_sparse_kd_from_hidden`. ``temperature`` softens the
        student only: the stored distribution was taken at the cache's temperature, which the task checks
        equals the term's. A dense teacher (logits) meeting a chunked student is computed the same way with
        every id kept (k = V), which equals the dense divergence exactly.
        """
        f = inputs.teacher_features
        if TEACHER_IDS not in f:
            if inputs.student_logits is not None or inputs.teacher_logits is None or LM_HIDDEN in f:
                return None
            if self.sparse_name is None:
                return None
            logp = torch.log_softmax(inputs.teacher_logits.float() / temperature, dim=-1)
            ids = torch.arange(logp.shape[-1], device=logp.device).expand(logp.shape)
            f = {TEACHER_IDS: ids, TEACHER_LOGP: logp, TEACHER_TAIL: logp.new_zeros(logp.shape[:-1])}
        if self.sparse_name is None:
            raise ValueError(self._needs_dense())
        if inputs.row_weight is not None:
            raise ValueError(
                "per-row weights (method.name=paced) cannot be combined with a sparse teacher cache; use a dense "
                "cache (teacher.outputs.kind=dense) or the live teacher"
            )
        kind = "topk" if TEACHER_TAIL in f else "sampled"
        DF.check_sparse_divergence(kind, self.sparse_name)
        common = {"temperature": temperature, "mask": inputs.mask, "num_valid": num_valid}
        if kind == "topk":
            kwargs = {**kwargs, "teacher_tail": f[TEACHER_TAIL]}
        else:
            kwargs = {"teacher_weights": f[TEACHER_WEIGHTS]}
        if inputs.student_logits is None:
            h = self._from_hidden(inputs, teacher=False)
            return DF.chunked_sparse_kd_from_hidden(
                h["student_hidden"], h["student_head_weight"], f[TEACHER_IDS], f[TEACHER_LOGP], kind=kind,
                divergence=self.sparse_name, student_head_bias=h["student_head_bias"], chunk_size=self.chunk_size,
                **common, **kwargs,
            )  # fmt: skip
        if kind == "topk":
            tail = kwargs.pop("teacher_tail")
            return DF.topk_tail_divergence(
                inputs.student_logits, f[TEACHER_IDS], f[TEACHER_LOGP], tail, divergence=self.sparse_name,
                **common, **kwargs,
            )  # fmt: skip
        return DF.sampled_forward_kl(
            inputs.student_logits, f[TEACHER_IDS], f[TEACHER_WEIGHTS], f[TEACHER_LOGP], **common
        )

    def _needs_dense(self) -> str:
        return (
            f"loss term {type(self).__name__} needs the teacher's full logits, but the teacher is a sparse (top-k or "
            "sampled) cache; use forward_kl, reverse_kl or jsd with it, or a dense cache (teacher.outputs.kind=dense)"
        )

    def _teacher_logits(self, inputs: LossInputs) -> Tensor:
        if inputs.teacher_logits is None and TEACHER_IDS in inputs.teacher_features:
            raise ValueError(self._needs_dense())
        if inputs.teacher_logits is None:
            raise ValueError(f"loss term {type(self).__name__} needs teacher logits, but the batch has none")
        return inputs.teacher_logits

    @staticmethod
    def _local_share(local: Tensor, rows: Tensor, num_valid: Tensor | float | None) -> Tensor:
        """A micro-batch's mean ``local`` over its ``rows``, scaled by ``local rows / global rows``: the
        micro-batches' values then add up to their row-weighted mean (terms over relations between rows,
        or over views, that cannot be summed row by row)."""
        if num_valid is None:
            return local
        n = rows.sum().to(local.dtype)
        return local * n / torch.as_tensor(num_valid, dtype=local.dtype, device=local.device).clamp_min(1.0)

    @staticmethod
    def _weighted(
        per_row: Tensor, inputs: LossInputs, rows: Tensor, num_valid: Tensor | float | None
    ) -> Tensor:
        """``sum_i w_i * per_row_i / num_valid`` over ``rows``, with ``w = inputs.row_weight``."""
        return weighted_row_mean(per_row, inputs.row_weight, rows, num_valid)


class TermConfig(StrictModel):
    """Fields common to every loss term."""

    weight: float = Field(1.0, description="weight of this term in the total loss (may be negative or > 1)")
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="ramp the weight linearly from 0 over this many epochs (DKD's warm-up)"
    )
    from_epoch: float = Field(0.0, ge=0.0, description="the term is off (weight 0) before this epoch")
    until_epoch: float | None = Field(
        None, gt=0.0, description="the term is off from this epoch on (e.g. forward KL, then reverse KL)"
    )

    @model_validator(mode="after")
    def _window(self) -> TermConfig:
        if self.until_epoch is not None and self.until_epoch <= self.from_epoch:
            raise ValueError(
                f"conflicting fields: until_epoch={self.until_epoch} must be after from_epoch={self.from_epoch}"
            )
        return self

    def hyperparameters(self) -> dict:
        return self.model_dump(exclude={"name", "weight", "warmup_epochs", "from_epoch", "until_epoch"})


def labelled_rows(target: Tensor, mask: Tensor) -> Tensor:
    return mask & (target != IGNORE_INDEX)


def zero_like_loss(logits: Tensor) -> Tensor:
    """A zero that stays connected to the graph (so data-parallel gradient hooks still fire)."""
    return (logits.sum() * 0.0).to(torch.float32)
