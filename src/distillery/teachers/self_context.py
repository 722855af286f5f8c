"""A language model that teaches itself: its own weights, shown privileged context the student lacks.

The teacher is the student's weights -- a frozen copy of the initial student, the live student under
``no_grad``, or an EMA of it -- run on the prompt **plus a context** (the gold answer as a
demonstration, a knowledge passage, a hint, the reward of an earlier attempt: see
:mod:`distillery.data.text.context`); the student reads the bare prompt. Both then see the same
response tokens, and the teacher's next-token distributions over them are realigned position by
position onto the student's row, so any token-level divergence applies unchanged. This is context
distillation ("Knowledge Injection via Prompt Distillation"), and with on-policy responses on-policy
self-distillation (OPSD, "Privileged Information Distillation for Language Models").

Row layout (the :class:`~distillery.data.text.TokenDataset` convention: ``labels`` equal the ids on
learned tokens and -100 elsewhere; the response starts at the first learned position ``r``)::

    student   [bos] p1 .. pm | y1 .. yn [eos] <pad>..
    teacher   [bos] before  p1 .. pm  after | y1 .. yn [eos] <pad>..

``before``/``after`` are the template's text around ``{prompt}``, tokenized per example; the
student's prompt tokens are copied, never re-tokenized. If the teacher's response starts at ``r'``,
its shifted logits at ``r' - 1 + j`` predict ``y_{j+1}`` as the student's at ``r - 1 + j`` do, so the
realignment is a per-row shift by ``r' - r``. Everything from the first learned token to the end of
the row moves as one block, so a chat whose later user turns are unlearned realigns too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.models.adapters import LM_HIDDEN, ModelOutput
from distillery.teachers.base import BaseTeacher, TeacherOutput
from distillery.teachers.ema import EMATeacher
from distillery.teachers.frozen import FrozenTeacher

# per sample id: the template's token ids before the prompt, and after it (None: no {prompt}, the
# context replaces the prompt)
Context = tuple[Sequence[int], Sequence[int] | None]

WEIGHTS = ("initial", "live", "ema")

# batch keys that give each row's whole teacher prompt (``<bos>`` included) instead of the fixed
# contexts: ``[B, P]`` ids, right padded, and ``[B]`` lengths (SD-Zero's reviser prompts, built per
# batch by :class:`distillery.generation.revision.RevisionBatches`)
TEACHER_PROMPT_IDS = "teacher_prompt_ids"
TEACHER_PROMPT_LENGTHS = "teacher_prompt_lengths"


def response_starts(labels: Tensor) -> Tensor:
    """``[B]`` index of each row's first learned token (``labels != -100``); a row with none gets its length.

    Example:
        >>> response_starts(torch.tensor([[-100, -100, 7, 2], [-100, 5, -100, -100]]))
        tensor([2, 1])
    """
    learned = labels != -100
    first = learned.int().argmax(dim=1)
    return torch.where(learned.any(dim=1), first, torch.full_like(first, labels.shape[1]))


def teacher_prompt(
    prompt: Sequence[int], context: Context, bos_id: int | None, room: int | None, truncate: bool
) -> list[int]:
    """The teacher's prompt ids for one row: ``[bos] before prompt after`` (``[bos] before`` without
    ``{prompt}``), the bos kept only if the student's prompt starts with it.

    ``room`` is the most tokens the prompt may take (the teacher's maximum length minus the row's
    response); with ``truncate`` the context loses tokens from its start to fit, else a row that does
    not fit is an error.

    Example:
        >>> teacher_prompt([1, 5, 6], ([9, 9], [4]), bos_id=1, room=None, truncate=False)
        [1, 9, 9, 5, 6, 4]
        >>> teacher_prompt([1, 5, 6], ([9, 9], [4]), bos_id=1, room=5, truncate=True)
        [1, 9, 5, 6, 4]
    """
    prompt = list(prompt)
    head = prompt[:1] if prompt and bos_id is not None and prompt[0] == bos_id else []
    body = prompt[len(head) :]
    before, after = list(context[0]), context[1]
    tail = [] if after is None else [*body, *after]
    if room is not None and len(head) + len(before) + len(tail) > room:
        over = len(head) + len(before) + len(tail) - room
        if not truncate or over > len(before):
            raise ValueError(
                f"the teacher's input is {over} tokens longer than its maximum length"
                + ("" if truncate else "; set teacher.truncate_context: true to drop the context's start")
            )
        before = before[over:]
    return [*head, *before, *tail]


def context_batch(
    batch: Mapping[str, Tensor],
    contexts: Mapping[int, Context] | Sequence[Context],
    *,
    pad_id: int,
    bos_id: int | None = None,
    max_length: int | None = None,
    truncate: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """The teacher's batch for a student batch, and each row's shift ``r' - r`` (``[B]``).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (right padded) and ``index``
            ``[B]``, the sample ids ``contexts`` is keyed by.
        contexts: per sample id, the template's ids before and after the prompt.
        pad_id, bos_id: special ids.
        max_length: the teacher's maximum sequence length (None: unlimited).
        truncate: shorten a context from its start when a row would exceed ``max_length``.

    Example:
        >>> b = {"input_ids": torch.tensor([[1, 5, 7, 2], [1, 6, 2, 0]]),
        ...      "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        ...      "labels": torch.tensor([[-100, -100, 7, 2], [-100, -100, 2, -100]]),
        ...      "index": torch.tensor([0, 1])}
        >>> tb, shift = context_batch(b, [([9], []), ([8, 8], [])], pad_id=0, bos_id=1)
        >>> tb["input_ids"].tolist(), shift.tolist()
        ([[1, 9, 5, 7, 2], [1, 8, 8, 6, 2]], [1, 2])
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    starts = response_starts(batch["labels"])
    lengths = mask.sum(dim=1)
    rows, shifts = [], []
    for b in range(ids.shape[0]):
        r, n = int(starts[b]), int(lengths[b])
        response = ids[b, r:n].tolist()
        room = None if max_length is None else max_length - len(response)
        key = int(batch["index"][b])
        try:
            if TEACHER_PROMPT_IDS in batch:  # this batch's own teacher prompts (self-revision)
                given = batch[TEACHER_PROMPT_IDS][b, : int(batch[TEACHER_PROMPT_LENGTHS][b])].tolist()
                prompt = teacher_prompt(given[:1], (given[1:], None), given[0], room, truncate)
            else:
                prompt = teacher_prompt(ids[b, :r].tolist(), contexts[key], bos_id, room, truncate)
        except ValueError as exc:
            raise ValueError(f"sample {key}: {exc}") from None
        rows.append(prompt + response)
        shifts.append(len(prompt) - r)
    width = max(len(r) for r in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype)
    out_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for b, row in enumerate(rows):
        out_ids[b, : len(row)] = torch.tensor(row, dtype=ids.dtype)
        out_mask[b, : len(row)] = 1
    teacher = {"input_ids": out_ids.to(ids.device), "attention_mask": out_mask.to(ids.device)}
    return teacher, torch.tensor(shifts, device=ids.device)


def realign(values: Tensor, shifts: Tensor, positions: int, keep: Tensor | None = None) -> Tensor:
    """The teacher's shifted per-position values ``[B, T' - 1, ...]`` moved onto the student's ``positions``
    (``T - 1``): student position ``p`` takes teacher position ``p + shift``. Positions that fall
    outside the teacher's row, and those where ``keep`` ``[B, T - 1]`` is False, are zeros.

    Example:
        >>> v = torch.arange(6.0).reshape(1, 6)  # teacher positions 0..5
        >>> realign(v, torch.tensor([2]), 4)
        tensor([[2., 3., 4., 5.]])
        >>> realign(v, torch.tensor([-1]), 3)
        tensor([[0., 0., 1.]])
    """
    B, width = values.shape[0], values.shape[1]
    p = torch.arange(positions, device=values.device).unsqueeze(0) + shifts.to(values.device).unsqueeze(1)
    inside = (p >= 0) & (p < width)
    index = p.clamp(0, width - 1)
    index = index.reshape(B, positions, *([1] * (values.dim() - 2))).expand(B, positions, *values.shape[2:])
    out = values.gather(1, index)
    if keep is not None:
        inside = inside & keep.to(inside.device)
    inside = inside.reshape(B, positions, *([1] * (values.dim() - 2)))
    return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))


class _LiveTeacher(BaseTeacher):
    """The student itself under ``no_grad``, in evaluation mode for the forward (dropout off), its mode
    restored afterwards."""

    def __init__(self, student: nn.Module, adapter: Any) -> None:
        self.module, self.adapter = student, adapter

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.adapter.forward(self.module, batch)
        finally:
            self.module.train(was_training)
        return _float(out)


def _float(out: ModelOutput) -> ModelOutput:
    logits = None if out.logits is None else out.logits.float()
    return ModelOutput(logits=logits, features={k: v.float() for k, v in out.features.items()})


class SelfContextTeacher(BaseTeacher):
    """The student's own weights, run on each row's privileged context + prompt + the same response.

    Args:
        student: the student model (built, with its initial weights).
        contexts: per sample id (the batch's ``index``), the template's ids before and after the prompt.
        adapter: how the model is called (an :class:`~distillery.models.hf.HFCausalLMAdapter`); its
            shifted logits, and with a chunked loss its hidden states, are realigned.
        weights: ``initial`` (a frozen copy of ``student`` as given), ``live`` (``student`` itself,
            no gradient) or ``ema`` (a moving average of the student, ``momentum`` per step).
        momentum: the EMA momentum (``weights="ema"`` only).
        pad_id, bos_id: special ids.
        max_length: the model's maximum sequence length; ``truncate`` shortens contexts to fit.

    ``calls`` counts the teacher's forwards (one per batch the loss asks the teacher for).

    Example:
        >>> from distillery.models.hf import HFCausalLMAdapter
        >>> class Toy(nn.Module):  # logits = one-hot of the input ids
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return type("O", (), {"logits": nn.functional.one_hot(input_ids, 10).float()})()
        >>> t = SelfContextTeacher(Toy(), [([9, 9], [])], HFCausalLMAdapter(), pad_id=0, bos_id=1)
        >>> b = {"input_ids": torch.tensor([[1, 5, 7, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
        ...      "labels": torch.tensor([[-100, -100, 7, 2]]), "index": torch.tensor([0])}
        >>> t(b).logits.argmax(-1).tolist()[0][1:]  # positions predicting 7 and 2 see 5 and 7
        [5, 7]
    """

    def __init__(
        self,
        student: nn.Module,
        contexts: Mapping[int, Context] | Sequence[Context],
        adapter: Any,
        *,
        weights: str = "initial",
        momentum: float | None = None,
        pad_id: int,
        bos_id: int | None = None,
        max_length: int | None = None,
        truncate: bool = False,
    ) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
        if (weights == "ema") != (momentum is not None):
            raise ValueError("an EMA momentum is given exactly when weights='ema'")
        if weights == "initial":
            self.inner: BaseTeacher = FrozenTeacher(copy.deepcopy(student), adapter)
        elif weights == "live":
            self.inner = _LiveTeacher(student, adapter)
        else:
            self.inner = EMATeacher(student, momentum, adapter=adapter)
        self.contexts, self.adapter, self.weights = contexts, adapter, weights
        self.pad_id, self.bos_id, self.max_length, self.truncate = pad_id, bos_id, max_length, truncate
        self.calls = 0

    @property
    def module(self) -> nn.Module:
        return self.inner.module

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        t_batch, shifts = context_batch(
            batch,
            self.contexts,
            pad_id=self.pad_id,
            bos_id=self.bos_id,
            max_length=self.max_length,
            truncate=self.truncate,
        )
        out = self.inner(t_batch)
        self.calls += 1
        positions = batch["input_ids"].shape[1] - 1
        keep = batch["labels"][:, 1:] != -100  # positions with a target; the rest are zeros
        features = dict(out.features)
        if LM_HIDDEN in features:
            features[LM_HIDDEN] = realign(features[LM_HIDDEN], shifts, positions, keep)
        logits = None if out.logits is None else realign(out.logits, shifts, positions, keep)
        return TeacherOutput(logits=logits, features=features)

    def update(self, student: nn.Module, step: int) -> None:
        self.inner.update(student, step)

    def to(self, device: torch.device | str) -> SelfContextTeacher:
        if hasattr(self.inner, "to"):
            self.inner.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.inner.load_state_dict(state.get("inner", {}))
            self.calls = int(state.get("calls", 0))
