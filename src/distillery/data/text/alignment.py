"""Aligning two tokenizations of the same text: the spans where both have a token boundary.

A student and a teacher with different tokenizers cut the same text into different tokens. Wherever
both have a token boundary at the same character, the text before and after can be compared between
the two models; :func:`aligned_spans` finds the spans between consecutive shared boundaries, each as
a range of student tokens and a range of teacher tokens covering the same characters (a token
boundary of one side inside a span is not one of the other side's, so the span merges several
tokens of at least one side). This is the chunking of "Cross-Tokenizer Distillation via Approximate
Likelihood Matching" (Minixhofer et al., 2025); :func:`span_index` turns the spans into per-token span
ids for :func:`distillery.functional.cross_tokenizer.span_likelihood_loss`.

The input is each tokenization's character offsets, ``(start, end)`` per token, as a Hugging Face fast
tokenizer returns them (``return_offsets_mapping=True``). Pure Python: no tokenizer is loaded here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

Offsets = Sequence[tuple[int, int]]


class AlignedSpan(NamedTuple):
    """A span of text covered by student tokens ``[student_start, student_end)`` and by teacher tokens
    ``[teacher_start, teacher_end)`` (token indices, end exclusive)."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int


class _Side:
    """One tokenization's offsets, checked, with the character positions where it can be cut."""

    def __init__(self, offsets: Offsets, name: str) -> None:
        self.offsets = [self._pair(x, i, name) for i, x in enumerate(offsets)]
        # Tokens with empty offsets (special tokens: BOS, EOS, chat markers, mostly (0, 0)) cover no text.
        self.text = [i for i, (a, b) in enumerate(self.offsets) if b > a]
        for prev, cur in zip(self.text, self.text[1:]):
            (a0, b0), (a1, b1) = self.offsets[prev], self.offsets[cur]
            if a1 < a0 or b1 < b0:
                raise ValueError(
                    f"{name}_offsets are not in text order: token {cur} {(a1, b1)} comes after token "
                    f"{prev} {(a0, b0)}; pass the offsets of one text in token order"
                )
        # cuts[p] = k: the text tokens up to k end at or before p and all later ones start at or after p,
        # with token k ending exactly at p.
        self.cuts: dict[int, int] = {}
        for pos, k in enumerate(self.text):
            end = self.offsets[k][1]
            following = self.text[pos + 1] if pos + 1 < len(self.text) else None
            if following is None or self.offsets[following][0] >= end:
                self.cuts[end] = k
        # next_text[k + 1]: the first text token after token k (k = -1 included); len(offsets) if none.
        n = len(self.offsets)
        self.next_text = [n] * (n + 1)
        for i in range(n - 1, -1, -1):
            self.next_text[i] = i if self.offsets[i][1] > self.offsets[i][0] else self.next_text[i + 1]
        # empty_before[i]: the number of tokens with empty offsets among tokens [0, i).
        self.empty_before = [0] * (n + 1)
        for i, (a, b) in enumerate(self.offsets):
            self.empty_before[i + 1] = self.empty_before[i] + (b <= a)

    @staticmethod
    def _pair(x: tuple[int, int], i: int, name: str) -> tuple[int, int]:
        try:
            a, b = x
        except (TypeError, ValueError):
            raise ValueError(f"{name}_offsets[{i}] must be a (start, end) pair; got {x!r}") from None
        try:
            if isinstance(a, bool) or isinstance(b, bool):
                raise TypeError
            a, b = operator.index(a), operator.index(b)
        except TypeError:
            raise ValueError(f"{name}_offsets[{i}] must hold two integers; got {x!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"{name}_offsets[{i}] must satisfy 0 <= start <= end; got {x!r}")
        return a, b

    def clean(self, pos: int) -> bool:
        """No text token covers characters on both sides of ``pos``."""
        return not any(a < pos < b for a, b in (self.offsets[k] for k in self.text))

    def last_before(self, pos: int) -> int:
        """The index of the last text token ending at or before ``pos`` (-1 if none)."""
        last = -1
        for k in self.text:
            if self.offsets[k][1] <= pos:
                last = k
        return last

    def first_after(self, k: int) -> int:
        """The index of the first text token after token ``k``."""
        return self.next_text[k + 1]

    def has_gap(self, first: int, stop: int) -> bool:
        """A token with empty offsets lies among tokens ``[first, stop)``."""
        return self.empty_before[stop] > self.empty_before[first]


def aligned_spans(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    start: int = 0,
    end: int | None = None,
) -> list[AlignedSpan]:
    """The spans of text between consecutive character positions where both tokenizations cut.

    A side *cuts* at character ``p`` after token ``k`` when token ``k`` ends at ``p`` and no other
    token covers characters on both sides of ``p``. The spans run from one shared cut to the next:
    span ``j`` holds the tokens of each side that lie between them, so both sides' tokens in a span
    cover the same text (up to characters that a side's offsets leave out, such as spaces that some
    tokenizers trim from their offsets). Where the two tokenizations' boundaries disagree, the tokens
    are merged until they agree again. Every span has at least one token on each side, and the spans
    are in text order, none overlapping.

    * **Special tokens**: tokens with empty offsets (``start == end``, e.g. ``(0, 0)`` for BOS, EOS or
      chat-template markers) cover no text and belong to no span. A span whose tokens on one side
      would have such a token among them is dropped, so that every token in a span's ranges covers
      text.
    * **Character range**: only the text in ``[start, end)`` (e.g. the response after a prompt) is
      aligned: the first span starts at ``start`` when neither side has a token across it, else at the
      first shared cut after it; the last span ends at the last shared cut at or before ``end``.
      Tokens across either limit belong to no span.

    Args:
        student_offsets: ``(char_start, char_end)`` per student token, in token order.
        teacher_offsets: ``(char_start, char_end)`` per teacher token of the same text.
        start: the first character to align.
        end: one past the last character to align; None for the end of the text.

    Returns:
        The spans as :class:`AlignedSpan` ``(student_start, student_end, teacher_start, teacher_end)``
        token index ranges (end exclusive).

    Example:
        >>> student = [(0, 0), (0, 5), (5, 11)]  # [BOS] "hello" " world"
        >>> teacher = [(0, 3), (3, 5), (5, 9), (9, 11)]  # "hel" "lo" " wor" "ld"
        >>> aligned_spans(student, teacher)
        [AlignedSpan(student_start=1, student_end=2, teacher_start=0, teacher_end=2), AlignedSpan(student_start=2, student_end=3, teacher_start=2, teacher_end=4)]
        >>> [tuple(span) for span in aligned_spans(student, teacher, start=5)]
        [(2, 3, 2, 4)]
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an integer >= 0 (a character position); got {start!r}")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
        raise ValueError(f"end must be None or an integer >= start={start}; got {end!r}")
    student, teacher = _Side(student_offsets, "student"), _Side(teacher_offsets, "teacher")
    limit = math.inf if end is None else end
    shared = sorted(p for p in student.cuts if p in teacher.cuts and start <= p <= limit)
    if student.clean(start) and teacher.clean(start):
        last_s, last_t = student.last_before(start), teacher.last_before(start)
    elif shared:
        first = shared.pop(0)
        last_s, last_t = student.cuts[first], teacher.cuts[first]
    else:
        return []
    spans = []
    for p in shared:
        stop_s, stop_t = student.cuts[p] + 1, teacher.cuts[p] + 1
        if stop_s - 1 > last_s and stop_t - 1 > last_t:
            first_s, first_t = student.first_after(last_s), teacher.first_after(last_t)
            if not (student.has_gap(first_s, stop_s) or teacher.has_gap(first_t, stop_t)):
                spans.append(AlignedSpan(first_s, stop_s, first_t, stop_t))
        last_s, last_t = stop_s - 1, stop_t - 1
    return spans


def span_index(
    spans: Sequence[tuple[int, int, int, int]], n_student: int, n_teacher: int
) -> tuple[list[int], list[int]]:
    """Per-token span ids of both tokenizations: token ``i`` of a side gets ``j`` if it lies in span
    ``j``'s range on that side, else -1.

    The ids are the ``student_span`` / ``teacher_span`` of
    :func:`~distillery.functional.cross_tokenizer.span_likelihood_loss` (as tensors, padded with -1;
    shifted like the log-probabilities they label), with ``num_spans = len(spans)``.

    Args:
        spans: :func:`aligned_spans`' output (or any ``(s0, s1, t0, t1)`` ranges, none overlapping).
        n_student: the number of student tokens.
        n_teacher: the number of teacher tokens.

    Returns:
        ``(student_ids, teacher_ids)``: lists of ``n_student`` and ``n_teacher`` ints.

    Example:
        >>> span_index([(1, 2, 0, 2), (2, 3, 2, 4)], 4, 4)
        ([-1, 0, 1, -1], [0, 0, 1, 1])
    """
    ids = {"student": [-1] * n_student, "teacher": [-1] * n_teacher}
    for j, span in enumerate(spans):
        s0, s1, t0, t1 = span
        for side, lo, hi in (("student", s0, s1), ("teacher", t0, t1)):
            row = ids[side]
            if not 0 <= lo < hi <= len(row):
                raise ValueError(
                    f"span {j} {tuple(span)}: the {side} range [{lo}, {hi}) is empty or outside the "
                    f"{len(row)} {side} tokens"
                )
            for i in range(lo, hi):
                if row[i] != -1:
                    raise ValueError(f"span {j} {tuple(span)} overlaps span {row[i]} at {side} token {i}")
                row[i] = j
    return ids["student"], ids["teacher"]
