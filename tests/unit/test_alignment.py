"""aligned_spans and span_index: two tokenizations of one text, cut where both have a boundary.

Hand-built tokenizations (byte-level against BPE-like, both directions; boundaries that disagree;
special tokens; trimmed spaces; byte tokens of one multi-byte character; a character range), a
property check over random tokenizations of random text, and the errors.
"""

import itertools
import random

import pytest

from distillery.data.text.alignment import AlignedSpan, aligned_spans, span_index

TEXT = "hello world"
BYTES = [(i, i + 1) for i in range(len(TEXT))]  # one token per character
BPE = [(0, 3), (3, 5), (5, 9), (9, 11)]  # "hel" "lo" " wor" "ld"


def _pieces(text, offsets, r):
    """The text each side's tokens in a span's range cover."""
    return "".join(text[a:b] for a, b in offsets[r[0] : r[1]])


def test_byte_level_against_bpe_both_directions():
    spans = aligned_spans(BYTES, BPE)
    assert spans == [(0, 3, 0, 1), (3, 5, 1, 2), (5, 9, 2, 3), (9, 11, 3, 4)]
    assert all(isinstance(span, AlignedSpan) for span in spans)
    assert [_pieces(TEXT, BYTES, span[:2]) for span in spans] == ["hel", "lo", " wor", "ld"]
    assert aligned_spans(BPE, BYTES) == [(0, 1, 0, 3), (1, 2, 3, 5), (2, 3, 5, 9), (3, 4, 9, 11)]
    assert aligned_spans(BYTES, BYTES) == [(i, i + 1, i, i + 1) for i in range(11)]


def test_disagreeing_boundaries_are_merged():
    student = [(0, 4), (4, 8), (8, 11)]  # "hell" "o wo" "rld"
    assert aligned_spans(student, BPE) == [(0, 3, 0, 4)]  # only the end of the text is shared
    student = [(0, 5), (5, 7), (7, 11)]  # "hello" " w" "orld"
    assert aligned_spans(student, BPE) == [(0, 1, 0, 2), (1, 3, 2, 4)]
    assert aligned_spans(BPE, student) == [(0, 2, 0, 1), (2, 4, 1, 3)]


def test_special_tokens_are_skipped():
    student = [(0, 0), (0, 5), (5, 11), (0, 0)]  # [BOS] "hello" " world" [EOS]
    teacher = [(0, 0), (0, 0), *BPE]  # two special tokens first
    assert aligned_spans(student, teacher) == [(1, 2, 2, 4), (2, 3, 4, 6)]
    s_ids, t_ids = span_index(aligned_spans(student, teacher), len(student), len(teacher))
    assert s_ids == [-1, 0, 1, -1] and t_ids == [-1, -1, 0, 0, 1, 1]
    # A special token between two shared boundaries belongs to no span; one inside a span on one side
    # drops that span (its tokens would not all cover text).
    student = [(0, 5), (0, 0), (5, 11)]
    assert aligned_spans(student, BPE) == [(0, 1, 0, 2), (2, 3, 2, 4)]
    student = [(0, 3), (0, 0), (3, 5), (5, 11)]  # [SEP] inside "hello" for the teacher below
    assert aligned_spans(student, [(0, 5), (5, 11)]) == [(3, 4, 1, 2)]
    assert aligned_spans([(0, 0)], BPE) == [] and aligned_spans([], []) == []


def test_character_range():
    # The response starts at character 5 (" world"): both sides cut there.
    assert aligned_spans(BYTES, BPE, start=5) == [(5, 9, 2, 3), (9, 11, 3, 4)]
    # At 6 the teacher's " wor" crosses the start: the first span begins at the next shared cut.
    assert aligned_spans(BYTES, BPE, start=6) == [(9, 11, 3, 4)]
    # An end inside "ld" drops the last span; an end at a shared cut keeps it.
    assert aligned_spans(BYTES, BPE, end=10) == [(0, 3, 0, 1), (3, 5, 1, 2), (5, 9, 2, 3)]
    assert aligned_spans(BYTES, BPE, start=3, end=9) == [(3, 5, 1, 2), (5, 9, 2, 3)]
    assert aligned_spans(BYTES, BPE, start=6, end=9) == []
    assert aligned_spans(BYTES, BPE, start=11) == []


def test_trimmed_spaces_and_multibyte_characters():
    # A tokenizer whose offsets leave the space out: the spans still end at the same characters.
    trimmed = [(0, 5), (6, 11)]  # "hello" "world"
    assert aligned_spans(BPE, trimmed) == [(0, 2, 0, 1), (2, 4, 1, 2)]
    assert aligned_spans(BYTES, trimmed, start=5) == [(5, 11, 1, 2)]
    # "é!" in a byte-level tokenizer: the two bytes of "é" share its character offsets (0, 1).
    byte_level = [(0, 1), (0, 1), (1, 2)]
    assert aligned_spans(byte_level, [(0, 1), (1, 2)]) == [(0, 2, 0, 1), (2, 3, 1, 2)]
    assert aligned_spans(byte_level, [(0, 2)]) == [(0, 3, 0, 1)]


def _random_tokenization(n, rng, specials):
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1)))
    bounds = [0, *cuts, n]
    offsets = list(itertools.pairwise(bounds))
    for _ in range(specials):
        offsets.insert(rng.choice([0, len(offsets)]), (0, 0))
    return offsets


def test_random_tokenizations_cover_the_same_text():
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 30)
        text = "".join(rng.choice("ab c") for _ in range(n))
        student = _random_tokenization(n, rng, specials=trial % 2)
        teacher = _random_tokenization(n, rng, specials=trial % 3)
        start = rng.randint(0, n) if trial % 4 == 0 else 0
        spans = aligned_spans(student, teacher, start=start)
        pieces = [(_pieces(text, student, span[:2]), _pieces(text, teacher, span[2:])) for span in spans]
        assert all(a == b for a, b in pieces)
        s_cuts = {b for a, b in student if b > a}
        t_cuts = {b for a, b in teacher if b > a}
        shared = sorted(p for p in s_cuts & t_cuts if p > start)
        starts_clean = all(not a < start < b for a, b in student + teacher)
        # Every shared boundary after the start ends one span (the first one only opens the first span
        # when a token crosses the start), and together the spans cover the aligned text.
        assert [len("".join(a for a, _ in pieces[: i + 1])) for i in range(len(pieces))] == [
            p - (start if starts_clean else shared[0]) for p in (shared if starts_clean else shared[1:])
        ]
        s_ids, t_ids = span_index(spans, len(student), len(teacher))
        assert all(i == -1 or student[k][1] > student[k][0] for k, i in enumerate(s_ids))
        assert [i for i in s_ids if i >= 0] == sorted(i for i in s_ids if i >= 0)
        assert set(t_ids) - {-1} == set(range(len(spans)))


def test_span_index_and_errors():
    assert span_index([], 2, 1) == ([-1, -1], [-1])
    assert span_index(aligned_spans(BYTES, BPE), 11, 4) == ([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="overlaps span 0"):
        span_index([(0, 2, 0, 1), (1, 3, 1, 2)], 3, 2)
    with pytest.raises(ValueError, match="outside"):
        span_index([(0, 4, 0, 1)], 3, 2)
    with pytest.raises(ValueError, match="empty"):
        span_index([(1, 1, 0, 1)], 3, 2)
    with pytest.raises(ValueError, match="not in text order"):
        aligned_spans([(5, 11), (0, 5)], BPE)
    with pytest.raises(ValueError, match=r"student_offsets\[1\]"):
        aligned_spans([(0, 5), (7, 6)], BPE)
    with pytest.raises(ValueError, match=r"teacher_offsets\[0\] must be a \(start, end\) pair"):
        aligned_spans(BPE, [(0, 1, 2)])
    with pytest.raises(ValueError, match="two integers"):
        aligned_spans(BPE, [(0.0, 1.0)])
    with pytest.raises(ValueError, match="start"):
        aligned_spans(BPE, BPE, start=-1)
    with pytest.raises(ValueError, match="end"):
        aligned_spans(BPE, BPE, start=4, end=3)
