"""Several teachers as one: their distributions combined per row, members dropped at random per step.

:class:`MultiTeacher` calls every member that takes part in the step on the batch and combines their
logits with :func:`distillery.functional.combine_teachers` (``mean``, ``weighted``, ``confidence``
or ``agreement``). It works over any leading shape of the logits: ``[B, C]`` for classifiers,
``[B, L, V]`` for language models (rows without a label, ``-100``, are handled by the rules).

The rows the teacher's terms should not learn from (``agreement``: the rows the members disagree
on) reach them through the output feature :data:`~distillery.models.adapters.TEACHER_ROW_WEIGHT`:
the objective multiplies it into the row weights (the mechanism of per-row weights,
:attr:`distillery.losses.LossInputs.row_weight`) of the terms that use the teacher, so ``ce`` still
learns every labelled row. A term's normaliser stays its global row count, so a step that keeps
fewer rows contributes proportionally less (as FixMatch's confidence mask is normalised by the
whole batch); the teacher's terms must support row weights (those over logits do).

Teacher dropping is drawn per optimizer step from a generator seeded by ``(seed, step)``: the same
members are left out of every micro-batch of a step, on every process, and again after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.errors import ConfigError
from distillery.functional.multi_teacher import COMBINES, CONFIDENCES, combine_teachers, drop_members
from distillery.models.adapters import TEACHER_ROW_WEIGHT, ClassifierAdapter
from distillery.teachers.base import BaseTeacher, Teacher, TeacherOutput
from distillery.teachers.frozen import FrozenTeacher


def _as_teacher(member: Any, adapter: Any) -> Teacher:
    """A Teacher as it is; a module (or a ``(module, adapter)`` pair) as a :class:`FrozenTeacher`."""
    if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], nn.Module):
        return FrozenTeacher(member[0], member[1])
    if isinstance(member, nn.Module):
        return FrozenTeacher(member, adapter)
    if callable(member):
        return member
    raise TypeError(
        f"a MultiTeacher member must be a Teacher, an nn.Module or a (module, adapter) pair; got {type(member).__name__}"
    )


class MultiTeacher(BaseTeacher):
    """K teachers combined into one target per row (see :mod:`distillery.functional.multi_teacher`).

    Args:
        members: K >= 2 teachers: :class:`~distillery.teachers.base.Teacher` objects (frozen,
            precomputed, ...), modules (frozen here, called through ``adapter``), or ``(module,
            adapter)`` pairs.
        combine: ``mean`` (probabilities), ``weighted`` (fixed ``weights``), ``confidence``
            (per-row weights from each member's ``confidence``: ``entropy`` or ``label``, at
            ``temperature``) or ``agreement`` (the mean, and only the rows whose members agree on
            the top-1 class count in the loss).
        weights: ``[K]`` non-negative weights for ``weighted`` (normalised over the members taking part).
        drop: members left out of each optimizer step: an integer (exactly that many, drawn
            uniformly) or a float probability (each member independently; one is always kept).
            0 or None: every member every step.
        seed: seed of the drop draws (with the step number).
        names: one name per member in :meth:`metrics` (default ``member 1`` ... ``member K``).
        adapter: how to read the rows' labels and mask from a batch (``adapter.rows(batch)``), and
            how to call members given as modules (default: a classifier adapter).
        ignore_index: the label of rows without one.

    Per-member contributions are accumulated over the rows it sees (the valid rows of
    ``adapter.rows``): :meth:`metrics` gives each member's mean weight, how many steps it was
    dropped from and the fraction of rows kept; they are part of :meth:`state_dict`, with the step
    counter that seeds the drops, so a resumed run continues them exactly.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> teacher = MultiTeacher([a, b], "agreement")
        >>> out = teacher({"x": torch.randn(5, 4), "y": torch.zeros(5, dtype=torch.long)})
        >>> out.logits.shape, sorted(out.features), teacher.metrics()["rows"]
        (torch.Size([5, 3]), ['teacher_row_weight'], 5.0)
    """

    def __init__(
        self,
        members: Sequence[Any],
        combine: str = "mean",
        *,
        weights: Sequence[float] | None = None,
        confidence: str = "entropy",
        temperature: float = 1.0,
        drop: int | float | None = None,
        seed: int = 0,
        names: Sequence[str] | None = None,
        adapter: Any = None,
        ignore_index: int = -100,
    ) -> None:
        if len(members) < 2:
            raise ValueError(f"a MultiTeacher needs at least 2 members; got {len(members)}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {combine!r}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}; got {confidence!r}")
        if (weights is not None) != (combine == "weighted"):
            raise ValueError('weights are the fixed weights of combine="weighted", and it needs them')
        k = len(members)
        if weights is not None and len(weights) != k:
            raise ValueError(f"{len(weights)} weights for {k} members; give one per member")
        self.adapter = adapter or getattr(members[0], "adapter", None) or ClassifierAdapter()
        self.members = [_as_teacher(m, self.adapter) for m in members]
        self.names = list(names) if names is not None else [f"member {i + 1}" for i in range(k)]
        if len(self.names) != k or len(set(self.names)) != k:
            raise ValueError(f"names must be {k} distinct names, one per member; got {self.names}")
        self.combine = combine
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights])
        self.confidence = confidence
        self.temperature = float(temperature)
        self.drop = drop or 0
        drop_members(
            k, self.drop, torch.Generator().manual_seed(0)
        )  # checks the value (the global RNG untouched)
        self.seed = int(seed)
        self.ignore_index = ignore_index
        self.step = 0  # optimizer steps taken (update), the key of the drop draws
        self._keep_cache: tuple[int, Tensor] | None = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        k = len(self.members)
        self.rows = 0  # valid rows seen
        self.kept = 0  # of which kept (agreement)
        self.weight_sum = torch.zeros(k, dtype=torch.float64)  # sum over rows of each member's weight
        self.dropped = torch.zeros(k, dtype=torch.long)  # steps each member was left out of
        self.steps = 0  # steps seen (a step's micro-batches count once)
        self._counted_step = -1

    # ---- the draw of a step ------------------------------------------------------------------------

    def keep_at(self, step: int) -> Tensor:
        """``[K]`` boolean: the members taking part in optimizer step ``step`` (0-based), a function of
        ``(seed, step)`` only."""
        k = len(self.members)
        if not self.drop:
            return torch.ones(k, dtype=torch.bool)
        if self._keep_cache is None or self._keep_cache[0] != step:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + 17) % (2**63))
            self._keep_cache = (step, drop_members(k, self.drop, g))
        return self._keep_cache[1]

    # ---- the Teacher protocol ----------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        keep = self.keep_at(self.step)
        outputs: list[Tensor | None] = [None] * len(self.members)
        with torch.no_grad():
            for i, member in enumerate(self.members):
                if bool(keep[i]):
                    out = member(batch, student_output)
                    if out.logits is None:
                        raise ConfigError(
                            f"MultiTeacher: {self.names[i]} returned no logits (a teacher that gives hidden states "
                            "for a chunked loss, or a sparse cache); members are combined from their full logits"
                        )
                    outputs[i] = out.logits.float()
            logits = self._stack(outputs)
            target, mask = self.adapter.rows(batch)
            if tuple(mask.shape) != tuple(logits.shape[1:-1]):
                raise ConfigError(
                    f"MultiTeacher: the members' logits {list(logits.shape[1:])} do not line up with the batch's "
                    f"rows {list(mask.shape)} (adapter {type(self.adapter).__name__}); give the adapter that reads "
                    "the rows the members' logits are aligned with"
                )
            result = combine_teachers(
                logits,
                self.combine,
                weights=self.weights,
                confidence=self.confidence,
                temperature=self.temperature,
                target=target if self.confidence == "label" else None,
                members=keep,
                ignore_index=self.ignore_index,
            )
            self._count(result.weights, result.keep, mask.to(logits.device), keep)
        features = {}
        if self.combine == "agreement":
            features[TEACHER_ROW_WEIGHT] = result.keep.to(result.logits.dtype)
        return TeacherOutput(logits=result.logits, features=features)

    def _stack(self, outputs: list[Tensor | None]) -> Tensor:
        """``[K, ..., C]``: the members' logits (zeros for the members dropped this step, weight 0)."""
        given = [(name, x) for name, x in zip(self.names, outputs) if x is not None]
        shapes = {tuple(x.shape) for _, x in given}
        if len(shapes) > 1:
            listed = ", ".join(f"{name} {list(x.shape)}" for name, x in given)
            raise ConfigError(
                f"MultiTeacher: the members give logits of different shapes ({listed}); combining their "
                "distributions needs one output space, the same classes (or, for language models, the same "
                "vocabulary) for every member, on the same rows; use members trained on the same labels (the "
                "same tokenizer), or distil from them in separate runs"
            )
        ref = given[0][1]
        return torch.stack([ref.new_zeros(ref.shape) if x is None else x for x in outputs])

    def _count(self, weights: Tensor, kept_rows: Tensor, valid: Tensor, keep: Tensor) -> None:
        valid = valid.to(torch.bool)
        self.rows += int(valid.sum())
        self.kept += int((kept_rows & valid).sum())
        w = torch.where(valid.unsqueeze(0), weights, torch.zeros_like(weights))
        self.weight_sum += w.reshape(len(self.members), -1).sum(-1).double().cpu()
        if self._counted_step != self.step:  # the first micro-batch of a step
            self._counted_step = self.step
            self.steps += 1
            self.dropped += (~keep).long()

    def observe(self, batch: Mapping[str, Tensor], student_output) -> None:
        for member in self.members:
            member.observe(batch, student_output)

    def update(self, student: nn.Module, step: int) -> None:
        self.step = int(step)
        for member in self.members:
            member.update(student, step)

    def to(self, device: torch.device | str) -> MultiTeacher:
        for member in self.members:
            if hasattr(member, "to"):
                member.to(device)
        return self

    # ---- contributions -----------------------------------------------------------------------------

    def member_metrics(self) -> dict[str, dict[str, float]]:
        """Per member: its mean weight over the rows seen, and the steps it was dropped from."""
        rows = max(self.rows, 1)
        return {
            name: {"mean_weight": float(self.weight_sum[i]) / rows, "dropped_steps": int(self.dropped[i])}
            for i, name in enumerate(self.names)
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the training log: ``steps``, ``rows``, ``kept_fraction`` (the rows kept by
        ``agreement``, 1 otherwise), and per member ``weight@<name>`` and ``dropped_steps@<name>``."""
        out = {
            "steps": float(self.steps),
            "rows": float(self.rows),
            "kept_fraction": self.kept / self.rows if self.rows else 1.0,
        }
        for name, m in self.member_metrics().items():
            out[f"weight@{name}"] = m["mean_weight"]
            out[f"dropped_steps@{name}"] = float(m["dropped_steps"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "rows": self.rows,
            "kept": self.kept,
            "weight_sum": self.weight_sum.clone(),
            "dropped": self.dropped.clone(),
            "steps": self.steps,
            "counted_step": self._counted_step,
            "members": [m.state_dict() for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint written before any step: nothing to restore
            return
        k = len(self.members)
        if len(state["members"]) != k or tuple(state["weight_sum"].shape) != (k,):
            raise ValueError(
                f"the saved MultiTeacher state has {len(state['members'])} members; this one has {k}"
            )
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.rows, self.kept, self.steps = int(state["rows"]), int(state["kept"]), int(state["steps"])
        self.weight_sum = state["weight_sum"].to(torch.float64).clone()
        self.dropped = state["dropped"].to(torch.long).clone()
        self._counted_step = int(state["counted_step"])
        self._keep_cache = None
        for member, member_state in zip(self.members, state["members"]):
            member.load_state_dict(member_state)
