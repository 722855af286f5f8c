"""A weighted sum of named loss terms, normalised by global row counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from distillery.functional.paced import expand_row_weight
from distillery.losses.base import LossInputs, LossTerm
from distillery.models.adapters import TEACHER_ROW_WEIGHT


class Objective(nn.Module):
    """``total = sum_k weight_k(epoch) * term_k``, each term averaged over its own rows.

    The loop calls :meth:`counts` on every micro-batch of an optimizer step (and sums them over
    data-parallel ranks) before calling :meth:`forward`, so each term is divided by its *global*
    number of rows: gradient accumulation and data parallelism then give the gradient of one big
    batch. The counts are one flat vector: one entry per term, or ``num_counts`` consecutive entries
    for a term with several normalisers (kd: valid rows, labelled rows).

    Per-row weights (``inputs.row_weight``, e.g. PACED's pass-rate weights) apply to every term; each
    term is still divided by its global row count. A term that cannot weight its rows is an error.

    A teacher may weigh the rows too: its output feature ``TEACHER_ROW_WEIGHT`` (in
    ``inputs.teacher_features``, the rows' shape or a prefix of it) multiplies the row weights of the
    terms that use the teacher (``needs_teacher``) only; the others (``ce``) keep every row. A
    multi-teacher's agreement filter gives 0 on the rows its members disagree on.
    """

    def __init__(
        self,
        terms: Mapping[str, LossTerm],
        weights: Mapping[str, float] | None = None,
        warmup_epochs: Mapping[str, float] | None = None,
        windows: Mapping[str, tuple[float, float | None]] | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in terms}
        self.warmup_epochs = {k: float((warmup_epochs or {}).get(k, 0.0)) for k in terms}
        # (from_epoch, until_epoch): the term counts only inside this window of training
        self.windows = {k: tuple((windows or {}).get(k, (0.0, None))) for k in terms}
        # where each term's counts sit in the flat vector of :meth:`counts`: (start, length)
        starts = [0]
        for term in self.terms.values():
            starts.append(starts[-1] + term.num_counts)
        self.spans = {k: (starts[i], starts[i + 1] - starts[i]) for i, k in enumerate(self.terms)}

    @property
    def names(self) -> list[str]:
        return list(self.terms.keys())

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    def counts(self, target: Tensor, mask: Tensor) -> Tensor:
        """Flat float64 vector of every term's row counts in this micro-batch (:meth:`LossTerm.counts`),
        in term order: one entry per term, ``num_counts`` entries for a term with several."""
        parts = []
        for name, term in self.terms.items():
            value = term.counts(target, mask).to(torch.float64).reshape(-1)
            if value.numel() != term.num_counts:
                raise ValueError(
                    f"loss term {name!r} returned {value.numel()} counts but declares num_counts={term.num_counts}"
                )
            parts.append(value)
        return torch.cat(parts)

    def weight_at(self, name: str, epoch: float) -> float:
        """The weight of term ``name`` at (fractional) ``epoch``: 0 outside its window, then a linear
        warm-up from its start (DKD), then the configured weight."""
        start, end = self.windows[name]
        if epoch < start or (end is not None and epoch >= end):
            return 0.0
        ramp = self.warmup_epochs[name]
        factor = 1.0 if ramp <= 0 else min(1.0, (epoch - start) / ramp)
        return self.weights[name] * factor

    def forward(self, inputs: LossInputs, num_valid: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted value of every term: its row sum divided by its entries of ``num_valid`` (the
        step's summed :meth:`counts`; each row scaled by ``inputs.row_weight`` when given)."""
        if inputs.row_weight is not None:
            unsupported = [name for name, term in self.terms.items() if not term.supports_row_weight]
            if unsupported:
                raise ValueError(
                    f"the batch has per-row weights (row_weight), but loss term(s) {unsupported} cannot "
                    "weight their rows; use terms over logits (ce, forward_kl, kd, jsd, ...) with them"
                )
        teacher_weight = inputs.teacher_features.get(TEACHER_ROW_WEIGHT)
        taught = inputs
        if teacher_weight is not None:  # the teacher's row weights: for the terms that use the teacher
            unsupported = [n for n, t in self.terms.items() if t.needs_teacher and not t.supports_row_weight]
            if unsupported:
                raise ValueError(
                    f"the teacher weighs the rows (it leaves some out of the loss), but loss term(s) {unsupported} "
                    "cannot weight their rows; use terms over logits (kd, forward_kl, jsd, ...) with this teacher"
                )
            weight = expand_row_weight(teacher_weight.to(inputs.mask.device), inputs.mask.shape)
            if inputs.row_weight is not None:
                weight = inputs.row_weight * weight
            taught = dataclasses.replace(inputs, row_weight=weight)
        parts = {}
        for name, term in self.terms.items():
            start, length = self.spans[name]
            if num_valid is None:
                counts = None
            else:  # a 0-d count for a one-count term, as LossTerm.counts gives it
                counts = num_valid[start] if length == 1 else num_valid[start : start + length]
            parts[name] = term(taught if term.needs_teacher else inputs, counts)
        return parts

    def total(self, parts: Mapping[str, Tensor], epoch: float) -> Tensor:
        return sum(self.weight_at(name, epoch) * value for name, value in parts.items())
