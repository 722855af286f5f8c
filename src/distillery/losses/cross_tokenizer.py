r"""Loss terms for a teacher with another tokenizer than the student's: ``uld`` and ``span_likelihood``.

Both read the features of :class:`~distillery.teachers.cross_tokenizer.CrossTokenizerTeacher` (names
in :mod:`distillery.data.text.cross_tokenizer`) and the student's logits ``[B, T-1, V_s]``; the maths
is in :mod:`distillery.functional.cross_tokenizer`. They set ``cross_tokenizer = True``: a task may
pair a student with a teacher of another tokenizer only when every term that uses the teacher has it.

**Rows.** The loop counts each term's rows from the student's ``(target, mask)`` before the forward
pass and all-reduces the counts over accumulation steps and processes; the teacher's tokens, and so
the pairs and spans, are known only after it. Both terms count the student's learned targets
(``target != -100`` on valid rows):

* ``uld``: the sum of the per-pair distances over the step's pairs, divided by the step's learned
  student targets. A target without a partner (the teacher's response is shorter) adds 0 but counts,
  so gradient accumulation and data parallelism give exactly the value of one big batch; when the
  teacher's tokenization is the shorter, the value is the pairs' mean times their share of the
  student's targets (the authors' code averages over the pairs of each response, then over the
  responses).
* ``span_likelihood``: the mean over the micro-batch's aligned spans (the official normalisation),
  scaled by the micro-batch's share of the step's learned student targets
  (:meth:`~distillery.losses.base.LossTerm._local_share`): with one micro-batch on one process it is
  the mean over the spans; otherwise the micro-batches' span means are weighted by their learned
  targets, since the spans are not known when the loop counts rows.

**Row weights** (:attr:`~distillery.losses.base.LossInputs.row_weight`, PACED's per-example weights):
``uld`` weighs each pair by its student row's weight; ``span_likelihood`` weighs each span by the mean
weight of its student tokens (the sequence's weight, for one weight per sequence). The normalisers
stay the counts above, not the sums of the weights.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from distillery.data.text.cross_tokenizer import (
    NUM_SPANS,
    STUDENT_SPAN,
    TEACHER_SPAN,
    TEACHER_TOKEN_LOGP,
    ULD_MASK,
    ULD_TEACHER_LOGP,
)
from distillery.functional.cross_tokenizer import SPAN_KINDS, span_likelihood_loss, uld_loss
from distillery.functional.paced import expand_row_weight
from distillery.losses.base import LossInputs, LossTerm, TermConfig, labelled_rows


def _per_span(values: Tensor, span: Tensor, num_spans: int) -> tuple[Tensor, Tensor]:
    """``(mean, count)`` ``[B, S]``: per row and span id, the mean of ``values`` ``[B, L]`` over the
    positions with that id (0 for none) and their number; positions with id -1 are left out."""
    inside = span >= 0
    ids = torch.where(inside, span, torch.full_like(span, num_spans))
    shape = (values.shape[0], num_spans + 1)
    sums = values.new_zeros(shape).scatter_add(1, ids, torch.where(inside, values, torch.zeros_like(values)))
    count = values.new_zeros(shape).scatter_add(1, ids, inside.to(values.dtype))
    return (sums / count.clamp_min(1))[:, :num_spans], count[:, :num_spans]


def _features(term: str, inputs: LossInputs, names: tuple[str, ...]) -> list[Tensor]:
    missing = [n for n in names if n not in inputs.teacher_features]
    if missing:
        raise ValueError(
            f"loss term {term} needs the cross-tokenizer teacher's features {', '.join(missing)}, which the "
            "teacher did not output; it works with a CrossTokenizerTeacher (a teacher with its own tokenizer; "
            f"for the span term with outputs including 'span', for uld including 'uld')"
        )
    if inputs.student_logits is None:
        raise ValueError(
            f"loss term {term} needs the student's logits, but the model returned hidden states for a chunked "
            "loss; turn the chunked loss off"
        )
    return [inputs.teacher_features[n] for n in names]


class UldConfig(TermConfig):
    """Universal Logit Distillation: l1 distance between sorted probability vectors, per paired token."""

    name: Literal["uld"] = "uld"
    cross_tokenizer: ClassVar[bool] = True
    temperature: float = Field(
        1.0, gt=0.0, description="the student's softmax temperature (and the teacher's)"
    )
    teacher_temperature: float | None = Field(
        None, gt=0.0, description="the teacher's softmax temperature, if different (null: temperature)"
    )


class UldLoss(LossTerm):
    r""":func:`distillery.functional.cross_tokenizer.uld_loss` between the student's learned targets and their partners.

    From "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"
    (Boizard et al., 2024): for the k-th learned target of the student and the k-th of the teacher,
    :math:`\sum_i |p_s^\downarrow(i) - p_t^\downarrow(i)|` over the sorted, zero-padded probability
    vectors. Summed over the pairs, divided by the (global) number of the student's learned targets
    (module docstring). No gradient reaches the teacher.
    """

    cross_tokenizer: ClassVar[bool] = True
    supports_row_weight: ClassVar[bool] = True

    def __init__(self, temperature: float = 1.0, teacher_temperature: float | None = None) -> None:
        super().__init__()
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        teacher, paired = _features("uld", inputs, (ULD_TEACHER_LOGP, ULD_MASK))
        rows = self.rows(inputs.target, inputs.mask)
        pairs = rows & paired.to(device=rows.device, dtype=torch.bool)
        weighted = inputs.row_weight is not None
        value = uld_loss(
            inputs.student_logits,
            teacher,
            self.temperature,
            teacher_temperature=self.teacher_temperature,
            mask=pairs,
            reduction="none" if weighted else "mean",
            num_valid=rows.sum() if num_valid is None else num_valid,
        )
        # unpaired rows hold 0 and count in the normaliser, as without weights
        return self._weighted(value, inputs, rows, num_valid) if weighted else value

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}"


class SpanLikelihoodConfig(TermConfig):
    """Approximate Likelihood Matching: both models' likelihoods of the aligned spans of the learned text."""

    name: Literal["span_likelihood"] = "span_likelihood"
    cross_tokenizer: ClassVar[bool] = True
    kind: Literal["binary_kl", "binary_ce", "abs"] = Field(
        "binary_kl",
        description="binary_kl: KL between the binarised span likelihoods; binary_ce: the official default (the "
        "same gradient, plus the teacher's entropy); abs: |log p_T - log p_S|",
    )
    binarization_temperature: float = Field(
        100.0, gt=0.0, description="tau: a span's probability p is binarised as p^(1/tau) (binary kinds)"
    )


class SpanLikelihoodLoss(LossTerm):
    r""":func:`distillery.functional.cross_tokenizer.span_likelihood_loss` over the aligned spans of the learned text.

    From "Cross-Tokenizer Distillation via Approximate Likelihood Matching" (Minixhofer et al., 2025):
    a span's log-likelihood is the sum of its tokens' log-probabilities on each side,
    :math:`\ell_S(k) = \sum_{i \in k} \log p_S(x_i \mid x_{<i})`; with ``kind="binary_kl"`` the term is
    :math:`\mathrm{KL}(\mathrm{Bern}(p_T^{1/\tau}) \,\|\, \mathrm{Bern}(p_S^{1/\tau}))` per span. The
    student's token log-probabilities are those of its targets; spans come from the teacher's features.
    Averaged over the micro-batch's spans, then scaled by its share of the step's learned student
    targets (module docstring).
    """

    cross_tokenizer: ClassVar[bool] = True
    supports_row_weight: ClassVar[bool] = True

    def __init__(self, kind: str = "binary_kl", binarization_temperature: float = 100.0) -> None:
        super().__init__()
        if kind not in SPAN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SPAN_KINDS)}; got {kind!r}")
        self.kind, self.binarization_temperature = kind, binarization_temperature

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        t_logp, t_span, s_span, count = _features(
            "span_likelihood", inputs, (TEACHER_TOKEN_LOGP, TEACHER_SPAN, STUDENT_SPAN, NUM_SPANS)
        )
        logits = inputs.student_logits
        logits = logits if logits.dtype == torch.float64 else logits.float()
        rows = self.rows(inputs.target, inputs.mask)
        tokens = inputs.target.clamp_min(0).unsqueeze(-1)
        s_logp = logits.gather(-1, tokens).squeeze(-1) - logits.logsumexp(dim=-1)  # (B, T-1)
        s_span = torch.where(rows, s_span.to(rows.device), torch.full_like(s_span, -1))
        num_spans = int(count.max()) if count.numel() else 0
        common = {"kind": self.kind, "binarization_temperature": self.binarization_temperature}
        if inputs.row_weight is None:
            local = span_likelihood_loss(s_logp, t_logp, s_span, t_span, num_spans, **common)
        else:
            per_span = span_likelihood_loss(
                s_logp, t_logp, s_span, t_span, num_spans, reduction="none", **common
            )  # (B, S), 0 on spans that do not count
            weight = expand_row_weight(inputs.row_weight, rows.shape).to(per_span.dtype)
            w_span, s_count = _per_span(weight, s_span, num_spans)
            _, t_count = _per_span(torch.ones_like(t_logp, dtype=per_span.dtype), t_span.long(), num_spans)
            valid = (s_count > 0) & (t_count > 0)
            local = (per_span * w_span).sum() / valid.sum().clamp_min(1)
        return self._local_share(local, rows, num_valid)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, binarization_temperature={self.binarization_temperature}"


# short name -> (config model, module class), for the LOSSES table
CROSS_TOKENIZER_LOSSES: dict[str, tuple[type[TermConfig], type[LossTerm]]] = {
    "uld": (UldConfig, UldLoss),
    "span_likelihood": (SpanLikelihoodConfig, SpanLikelihoodLoss),
}

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "SpanLikelihoodConfig",
    "SpanLikelihoodLoss",
    "UldConfig",
    "UldLoss",
]
