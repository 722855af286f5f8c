r"""A student's token rows read back as text and tokenized again for a teacher with another tokenizer.

Cross-tokenizer distillation compares a student and a teacher that cut the same text into different
tokens. :class:`CrossTokenizerAligner` takes a student LM batch (``input_ids``, ``attention_mask``,
``labels`` ``[B, T]``, right padded; :mod:`distillery.data.text.collate`'s layout) and gives, per row,
the teacher's tokens of the same text and what the losses of
:mod:`distillery.functional.cross_tokenizer` need to pair the two: the ``k``-th learned targets of
both sides (ULD) and the aligned spans (ALM), as tensors ``[B, ...]``.

**Offsets are byte offsets.** Every offset here counts bytes of the row's UTF-8 text, on both sides.
Byte-level tokenizers (the ``byte`` and ``bpe`` kinds of :func:`~distillery.data.text.train_tokenizer`,
GPT-2-style pretrained ones) cut characters such as ``"é"`` (2 bytes) or ``"—"`` (3 bytes) into
pieces; character offsets cannot say where such a piece ends (a fast tokenizer gives each piece the
whole character), bytes can. A student token's bytes come straight from its vocabulary entry (the
GPT-2 table maps each symbol back to its byte), so its offsets are exact by construction, and they
hold also for token sequences that re-encoding the text would not produce (responses sampled from
the student). For a student tokenizer that is not byte-level (a SentencePiece one, say), each run of
tokens is decoded and encoded again with ``return_offsets_mapping``; the ids must come back the
same, or the row is refused (:class:`ValueError`), since its offsets would be guesses; character
offsets become byte offsets through the text's UTF-8 lengths. The teacher's offsets are taken the same
way: exact bytes from a byte-level teacher's vocabulary when they spell the text, else its offset
mapping.

**Runs.** A student row is cut into *runs*: maximal stretches of ordinary tokens that are all learned
(``labels != -100``) or all not, and single special tokens (``<bos>``, ``<eos>``, ...). Each run of
text is tokenized by the teacher on its own, as the collators tokenize a prompt and its response
separately, so both sides have a token boundary wherever learning starts or stops; each special
token becomes the teacher's token of the same role (``bos``, ``eos``, ``pad``, ``unk``; others by
their text), and a teacher token is learned when its run is. Bytes of a run that are not UTF-8
text (a row cut by ``max_length`` inside ``"é"``, a byte a sampled response put where no character
can have it) are not shown to the teacher: it reads the text around them (:func:`utf8_pieces`), and
no aligned span covers them. The first token of a row is never learned (no position predicts it),
and no span holds it.

**Pairs and spans.** ULD pairs the ``k``-th learned target of the student with the ``k``-th of the
teacher, in row order, and leaves the longer side's extra targets unpaired (the authors' code cuts
both responses to the shorter). The spans are
:func:`~distillery.data.text.alignment.aligned_spans` of the two rows' byte offsets inside each
learned run of text, numbered in row order.

Row layout, with ``|`` between runs::

    student   <bos> | us er : ␣ | 4 2 | <eos> | <pad> ..      labels -100 on <bos> and the prompt
    teacher   <bos> | user :␣   | 42  | <eos> | <pad> ..

The feature names below are those of the output of
:class:`~distillery.teachers.cross_tokenizer.CrossTokenizerTeacher`, which the loss terms of
:mod:`distillery.losses.cross_tokenizer` read (``T`` the student's row width, ``T'`` the teacher's).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distillery.data.text.alignment import AlignedSpan, aligned_spans, span_index
from distillery.data.text.tokenizer import _byte_stand_ins

# [B, T-1, V_t] float32: the teacher's next-token log-probabilities, the k-th learned teacher target's
# at the position of the k-th learned student target (zeros elsewhere).
ULD_TEACHER_LOGP = "uld_teacher_logp"
# [B, T-1] bool: the student positions that ULD_TEACHER_LOGP fills (learned targets with a partner).
ULD_MASK = "uld_mask"
# [B, T'-1] float32: the teacher's log-probability of its actual next token at each of its positions.
TEACHER_TOKEN_LOGP = "teacher_token_logp"
# [B, T'-1] int64: the aligned span of the teacher token that position predicts, or -1.
TEACHER_SPAN = "teacher_span"
# [B, T-1] int64: the aligned span of the student token that position predicts, or -1.
STUDENT_SPAN = "student_span"
# [B] int64: the number of aligned spans of each row (its span ids are 0 .. count - 1).
NUM_SPANS = "num_spans"

CROSS_TOKENIZER_FEATURES = (
    ULD_TEACHER_LOGP,
    ULD_MASK,
    TEACHER_TOKEN_LOGP,
    TEACHER_SPAN,
    STUDENT_SPAN,
    NUM_SPANS,
)

IGNORE_INDEX = -100
# Special-token roles matched between the two tokenizers, in the order an id shared by several is read.
ROLES = ("bos", "eos", "pad", "unk")

Offsets = list[tuple[int, int]]


@functools.lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    """GPT-2's stand-in character -> the byte it stands for (the table of the byte-level tokenizers)."""
    return {ch: b for b, ch in enumerate(_byte_stand_ins())}


def _decoder_is_byte_level(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return any(_decoder_is_byte_level(d) for d in spec.get("decoders") or ())


def _char_to_byte(text: str) -> list[int]:
    """``[n + 1]``: the byte position of each character position of ``text`` (UTF-8)."""
    if text.isascii():
        return list(range(len(text) + 1))
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8")))
    return out


def utf8_pieces(data: bytes) -> list[tuple[int, int]]:
    """``[(a, z), ...]``: the maximal stretches of ``data`` that are UTF-8 text, in order.

    The bytes between them are not text: a character cut at either end (a row truncated inside
    ``"é"``), or bytes a sampled response put where no character can have them. The teacher reads the
    stretches only.

    Example:
        >>> utf8_pieces(b"\\xa9ab\\xe2\\x80")  # the second byte of "é", "ab", "—" without its last byte
        [(1, 3)]
        >>> utf8_pieces("é".encode() + b"\\xff" + b"x")
        [(0, 2), (3, 4)]
    """
    out, pos = [], 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start > 0:
                out.append((pos, pos + exc.start))
            pos += max(exc.end, exc.start + 1)
            continue
        out.append((pos, len(data)))
        break
    return out


class TokenizerSide:
    """One tokenizer as the aligner uses it: its special ids, and the bytes of its tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (fast, for offsets).
        name: ``"student"`` or ``"teacher"``, for messages.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer, self.name = tokenizer, name
        added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.special = {int(i) for i in tokenizer.all_special_ids} | {
            int(i) for i, t in added.items() if getattr(t, "special", False)
        }
        self.added = {int(i): str(t) if isinstance(t, str) else t.content for i, t in added.items()}
        self.by_content = {content: i for i, content in self.added.items()}
        self.roles = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ROLES}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        try:
            spec = json.loads(decoder.__getstate__()) if decoder is not None else None
        except (TypeError, ValueError, AttributeError):
            spec = None
        self.byte_level = _decoder_is_byte_level(spec)
        self._bytes: dict[int, bytes | None] = {}

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes token ``i`` spells (b"" for a special token), or None when its vocabulary entry is
        not made of byte symbols (then offsets come from the tokenizer's offset mapping)."""
        if i in self._bytes:
            return self._bytes[i]
        if i in self.special:
            out: bytes | None = b""
        elif i in self.added:  # added tokens are kept as their text, not as byte symbols
            out = self.added[i].encode("utf-8")
        else:
            piece = self.tokenizer.convert_ids_to_tokens(i)
            table = _byte_of()
            out = bytes(table[ch] for ch in piece) if piece and all(ch in table for ch in piece) else None
        self._bytes[i] = out
        return out

    def exact_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        """Each token's bytes when the tokenizer is byte-level and every token spells bytes, else None."""
        if not self.byte_level:
            return None
        pieces = [self.token_bytes(i) for i in ids]
        return None if any(p is None for p in pieces) else pieces  # type: ignore[return-value]

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        """``text``'s ids (no special tokens added) and their byte offsets within it."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(i) for i in enc["input_ids"]]
        pieces = self.exact_bytes(ids)
        if pieces is not None and b"".join(pieces) == text.encode("utf-8"):
            return ids, _cumulative(pieces, 0)
        return ids, _byte_offsets(text, enc["offset_mapping"])

    def decode_run(self, ids: Sequence[int], row: int) -> tuple[bytes, Offsets]:
        """The bytes of a run of ordinary tokens and each token's byte offsets within them."""
        pieces = self.exact_bytes(ids)
        if pieces is not None:
            return b"".join(pieces), _cumulative(pieces, 0)
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if [int(i) for i in enc["input_ids"]] != list(ids):
            raise ValueError(
                f"row {row}: the {self.name} tokens {list(ids)[:12]} decode to {text[:60]!r}, which the {self.name} "
                f"tokenizer encodes as {list(enc['input_ids'])[:12]}: its tokens' character offsets cannot be "
                "recovered. This happens with tokenizers that are not byte-level when the ids are not their own "
                "encoding of the text (sampled responses, hand-made rows); use a byte-level student tokenizer "
                "(data.tokenizer.kind=byte or bpe)"
            )
        return text.encode("utf-8"), _byte_offsets(text, enc["offset_mapping"])

    def role_of(self, i: int, first: bool) -> str | None:
        """The role of special id ``i`` (``bos`` first at a row's start, ``eos`` first elsewhere)."""
        order = ROLES if first else ("eos", "bos", "pad", "unk")
        return next((r for r in order if self.roles[r] == i), None)


def _cumulative(pieces: Sequence[bytes], start: int) -> Offsets:
    out, pos = [], start
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def _byte_offsets(text: str, char_offsets: Sequence[tuple[int, int]]) -> Offsets:
    to_byte = _char_to_byte(text)
    return [(to_byte[a], to_byte[b]) for a, b in char_offsets]


@dataclass(frozen=True)
class RowAlignment:
    """One row of a student batch, read as text and tokenized for the teacher.

    Offsets are byte offsets into ``text`` (the row's UTF-8 bytes, special tokens covering none).
    ``student_learned[i]``: student token ``i`` is a learned target (``labels != -100`` and ``i >= 1``);
    likewise ``teacher_learned``. ``learned_ranges``: the byte ranges of the learned runs of text.
    ``spans``: the aligned spans inside them (:func:`~distillery.data.text.alignment.aligned_spans`),
    none holding either side's first token.
    """

    text: bytes
    student_offsets: Offsets
    student_learned: list[bool]
    teacher_ids: list[int]
    teacher_offsets: Offsets
    teacher_learned: list[bool]
    learned_ranges: list[tuple[int, int]]
    spans: list[AlignedSpan]


@dataclass
class AlignedBatch:
    """A student batch's teacher rows and the tensors that pair both sides (module docstring).

    ``teacher_batch``: ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T']`` (right padded with
    the teacher's pad id; ``labels`` -100 off the learned tokens). ``uld_source`` ``[B, T-1]``: for
    the student's shifted position ``p``, the teacher's shifted position holding its partner
    (the k-th learned target of each side), or -1. ``student_span`` ``[B, T-1]``, ``teacher_span``
    ``[B, T'-1]``: span ids by shifted position (the span of the token that position predicts), -1
    outside spans. ``num_spans`` ``[B]``. ``rows``: the per-row details.
    """

    teacher_batch: dict[str, Tensor]
    uld_source: Tensor
    student_span: Tensor
    teacher_span: Tensor
    num_spans: Tensor
    rows: list[RowAlignment]


class CrossTokenizerAligner:
    """Turns a student LM batch into the teacher's batch of the same texts, and pairs their tokens.

    Args:
        student_tokenizer: the tokenizer of the batch's ``input_ids``.
        teacher_tokenizer: the teacher's (fast) tokenizer.
        add_bos: None: the teacher's special tokens mirror the student's (a row starting with the
            student's ``<bos>`` starts with the teacher's); True: every teacher row starts with the
            teacher's ``<bos>``; False: never (a leading ``<bos>`` is dropped).
        max_length: the teacher's longest row; longer rows lose their last tokens (and with them the
            pairs and spans there).

    Example:
        >>> from distillery.data.text.tokenizer import train_tokenizer
        >>> byte = train_tokenizer("", kind="byte", use_cache=False)
        >>> aligner = CrossTokenizerAligner(byte, byte)
        >>> ids = [1, *byte("é!", add_special_tokens=False)["input_ids"], 2]  # <bos> é(2 bytes) ! <eos>
        >>> row = aligner.row(ids, [False, True, True, True, True])
        >>> row.student_offsets, row.learned_ranges, row.spans[0]
        ([(0, 0), (0, 1), (1, 2), (2, 3), (3, 3)], [(0, 3)], AlignedSpan(student_start=1, student_end=2, teacher_start=1, teacher_end=2))
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        add_bos: bool | None = None,
        max_length: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None; got {max_length}")
        self.student = TokenizerSide(student_tokenizer, "student")
        self.teacher = TokenizerSide(teacher_tokenizer, "teacher")
        for role in ("pad",) + (("bos",) if add_bos else ()):
            if self.teacher.roles[role] is None:
                raise ValueError(f"the teacher tokenizer has no {role} token; set its {role}_token")
        self.add_bos, self.max_length = add_bos, max_length

    def _teacher_special(self, i: int, first: bool, row: int) -> int:
        role = self.student.role_of(i, first)
        if role is not None:
            out = self.teacher.roles[role]
            if out is None:
                raise ValueError(
                    f"row {row}: the student's {role} token (id {i}) has no counterpart: the teacher tokenizer "
                    f"has no {role}_token"
                )
            return int(out)
        content = self.student.added.get(i) or self.student.tokenizer.convert_ids_to_tokens(i)
        if content in self.teacher.by_content:
            return self.teacher.by_content[content]
        raise ValueError(
            f"row {row}: the student's special token {content!r} (id {i}) is not one of the teacher tokenizer's "
            f"tokens and has no role ({', '.join(ROLES)}) the teacher's tokens could stand for"
        )

    def row(self, ids: Sequence[int], learned: Sequence[bool], row: int = 0) -> RowAlignment:
        """The alignment of one student row: its real tokens ``ids`` (no padding) and, per token,
        whether it is a learned target (``labels != -100``)."""
        ids, flags = [int(i) for i in ids], [bool(x) for x in learned]
        if len(ids) != len(flags):
            raise ValueError(f"row {row}: {len(ids)} ids but {len(flags)} learned flags")
        text = bytearray()
        s_off: Offsets = []
        t_ids: list[int] = []
        t_off: Offsets = []
        t_flags: list[bool] = []
        ranges: list[tuple[int, int]] = []  # the learned runs' bytes
        holes: list[tuple[int, int]] = []  # bytes of the text that the teacher does not read
        k = 0
        while k < len(ids):
            pos = len(text)
            if ids[k] in self.student.special:
                t_ids.append(self._teacher_special(ids[k], k == 0, row))
                t_off.append((pos, pos))
                t_flags.append(flags[k])
                s_off.append((pos, pos))
                k += 1
                continue
            stop = k
            while stop < len(ids) and ids[stop] not in self.student.special and flags[stop] == flags[k]:
                stop += 1
            data, local = self.student.decode_run(ids[k:stop], row)
            s_off.extend((pos + a, pos + b) for a, b in local)
            text.extend(data)
            last = 0
            for a, z in utf8_pieces(data):
                if a > last:
                    holes.append((pos + last, pos + a))
                run_ids, run_off = self.teacher.encode(data[a:z].decode("utf-8"))
                t_ids.extend(run_ids)
                t_off.extend((pos + a + x, pos + a + y) for x, y in run_off)
                t_flags.extend([flags[k]] * len(run_ids))
                last = z
            if last < len(data):
                holes.append((pos + last, pos + len(data)))
            if flags[k]:
                ranges.append((pos, pos + len(data)))
            k = stop
        bos = self.teacher.roles["bos"]
        if self.add_bos is True and not (t_ids and t_ids[0] == bos):
            t_ids, t_off, t_flags = [int(bos), *t_ids], [(0, 0), *t_off], [False, *t_flags]
        elif self.add_bos is False and t_ids and t_ids[0] == bos:
            t_ids, t_off, t_flags = t_ids[1:], t_off[1:], t_flags[1:]
        if self.max_length is not None:
            n = self.max_length
            t_ids, t_off, t_flags = t_ids[:n], t_off[:n], t_flags[:n]
        spans = []
        for start, end in ranges:
            for span in aligned_spans(s_off, t_off, start, end):
                # nothing predicts a row's first token; a span over bytes the teacher did not read has
                # no teacher likelihood to match
                lo, hi = s_off[span.student_start][0], s_off[span.student_end - 1][1]
                if (
                    span.student_start > 0
                    and span.teacher_start > 0
                    and not any(a < hi and lo < z for a, z in holes)
                ):
                    spans.append(span)
        learned_out = [x and i > 0 for i, x in enumerate(flags)]
        t_learned = [x and j > 0 for j, x in enumerate(t_flags)]
        return RowAlignment(bytes(text), s_off, learned_out, t_ids, t_off, t_learned, ranges, spans)

    def __call__(self, batch: Mapping[str, Tensor]) -> AlignedBatch:
        """The alignment of a batch (``input_ids``, ``labels``, optional ``attention_mask`` ``[B, T]``)."""
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.dim() != 2 or labels.shape != ids.shape:
            raise ValueError(
                f"a cross-tokenizer teacher reads LM batches: input_ids and labels [B, T]; got "
                f"{tuple(ids.shape)} and {tuple(labels.shape)}"
            )
        B, T = ids.shape
        mask = batch.get("attention_mask")
        lengths = [T] * B if mask is None else mask.sum(dim=1).tolist()
        ids_l, labels_l = ids.tolist(), labels.tolist()
        rows = []
        for b in range(B):
            n = int(lengths[b])
            rows.append(self.row(ids_l[b][:n], [y != IGNORE_INDEX for y in labels_l[b][:n]], b))
        width = max([2, *(len(r.teacher_ids) for r in rows)])
        pad = int(self.teacher.roles["pad"])
        t_ids = torch.full((B, width), pad, dtype=torch.long)
        t_mask = torch.zeros((B, width), dtype=torch.long)
        t_labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        uld = torch.full((B, T - 1), -1, dtype=torch.long)
        s_span = torch.full((B, T - 1), -1, dtype=torch.long)
        t_span = torch.full((B, width - 1), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            n_t = len(r.teacher_ids)
            if n_t:
                t_ids[b, :n_t] = torch.tensor(r.teacher_ids)
                t_labels[b, :n_t] = torch.tensor(
                    [i if x else IGNORE_INDEX for i, x in zip(r.teacher_ids, r.teacher_learned)]
                )
            t_mask[b, : max(n_t, 1)] = 1  # an empty row keeps one (pad) token, so no attention row is empty
            s_pos = [i - 1 for i, x in enumerate(r.student_learned) if x]
            t_pos = [j - 1 for j, x in enumerate(r.teacher_learned) if x]
            pairs = min(len(s_pos), len(t_pos))
            if pairs:
                uld[b, s_pos[:pairs]] = torch.tensor(t_pos[:pairs])
            s_ids, t_ids_span = span_index(r.spans, len(r.student_offsets), n_t)
            if len(s_ids) > 1:
                s_span[b, : len(s_ids) - 1] = torch.tensor(s_ids[1:])
            if n_t > 1:
                t_span[b, : n_t - 1] = torch.tensor(t_ids_span[1:])
        device = ids.device
        teacher_batch = {
            "input_ids": t_ids.to(device),
            "attention_mask": t_mask.to(device),
            "labels": t_labels.to(device),
        }
        num_spans = torch.tensor([len(r.spans) for r in rows], dtype=torch.long)
        return AlignedBatch(
            teacher_batch, uld.to(device), s_span.to(device), t_span.to(device), num_spans.to(device), rows
        )


__all__ = [
    "CROSS_TOKENIZER_FEATURES",
    "NUM_SPANS",
    "STUDENT_SPAN",
    "TEACHER_SPAN",
    "TEACHER_TOKEN_LOGP",
    "ULD_MASK",
    "ULD_TEACHER_LOGP",
    "AlignedBatch",
    "CrossTokenizerAligner",
    "RowAlignment",
    "TokenizerSide",
    "utf8_pieces",
]
