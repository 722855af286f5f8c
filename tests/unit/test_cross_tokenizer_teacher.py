"""A teacher with another tokenizer: text and byte offsets recovered from student rows, the teacher's
rows and features checked against the teacher run on its own tokenization, the uld and
span_likelihood terms, padding, multi-byte characters, and a few training steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from distillery.data.text.collate import collate_pairs
from distillery.data.text.cross_tokenizer import CrossTokenizerAligner, utf8_pieces
from distillery.data.text.tokenizer import train_tokenizer
from distillery.functional.cross_tokenizer import span_likelihood_loss, uld_loss
from distillery.losses import LOSSES, LossInputs, Objective, build_loss
from distillery.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    SpanLikelihoodConfig,
    SpanLikelihoodLoss,
    UldConfig,
    UldLoss,
)
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.teachers.cross_tokenizer import (
    NUM_SPANS,
    STUDENT_SPAN,
    TEACHER_SPAN,
    TEACHER_TOKEN_LOGP,
    ULD_MASK,
    ULD_TEACHER_LOGP,
    CrossTokenizerTeacher,
)

BOS, EOS = 1, 2
CORPUS = "the cat sat on the mat. the café is open. a naïve cat. " * 6
BYTE = train_tokenizer("", kind="byte", use_cache=False)
BPE = train_tokenizer(CORPUS, 300, kind="bpe", use_cache=False)
SMALL = CausalLMConfig(hidden_size=16, layers=1, heads=2)
# prompt/response pairs: a multi-byte character in each response ("é" 2 bytes, "—" 3 bytes, "ï" 2)
PAIRS = [("Q: ", "the café—ok"), ("a ", "naïve cat"), ("", "sat — on")]


def lm(tokenizer, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm(SMALL, len(tokenizer)).eval()


def run_alone(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """``[n - 1, V]`` next-token log-probabilities of one row, run on its own (no batch, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def own_row(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """A tokenizer's own row of a pair (``<bos> prompt response <eos>``) and its first learned index."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return [BOS, *p, *r, EOS], 1 + len(p)


def bytes_of_pieces(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's bytes, each of its symbols read through the byte tokenizer's vocabulary (id = 3 + byte)."""
    return [
        b""
        if i in (0, BOS, EOS)
        else bytes(BYTE.convert_tokens_to_ids(c) - 3 for c in tokenizer.convert_ids_to_tokens(i))
        for i in ids
    ]


# ---- offsets and spans against hand-derived ones ---------------------------------------------------


# "Q: the café—ok": Q : ␣ t h e ␣ c a f é(2 bytes) —(3 bytes) o k = 17 bytes, the response from byte 3
BPE_PIECES = ["Q", ":", "Ġ", "the", "ĠcafÃ©", "â", "Ģ", "Ķ", "o", "k"]
BPE_OFFSETS = [
    (0, 0),
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 6),
    (6, 12),
    (12, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (16, 17),
    (17, 17),
]
BYTE_OFFSETS = [(0, 0), *[(b, b + 1) for b in range(17)], (17, 17)]
# shared cuts in [3, 17): 6, 12, 13, 14, 15, 16, 17; byte b is byte-token b + 1 (after <bos>)
BPE_SPANS = [(4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 11)]
BYTE_SPANS = [(4, 7), (7, 13), (13, 14), (14, 15), (15, 16), (16, 17), (17, 18)]


def test_byte_student_bpe_teacher_offsets_and_spans_are_the_hand_derived_ones():
    assert BPE.convert_ids_to_tokens(own_row(BPE, *PAIRS[0])[0][1:-1]) == BPE_PIECES  # the premise
    batch = collate_pairs(PAIRS[:1], BYTE)
    aligned = CrossTokenizerAligner(BYTE, BPE)(batch)
    row = aligned.rows[0]
    assert row.text == "Q: the café—ok".encode()
    assert row.student_offsets == BYTE_OFFSETS
    assert row.teacher_ids == own_row(BPE, *PAIRS[0])[0]
    assert row.teacher_offsets == BPE_OFFSETS
    assert row.learned_ranges == [(3, 17)]
    assert [(s.student_start, s.student_end) for s in row.spans] == BYTE_SPANS
    assert [(s.teacher_start, s.teacher_end) for s in row.spans] == BPE_SPANS
    # "é" is two byte tokens with exact byte offsets, inside the span of the BPE token " café"
    e = [i for i, (a, _) in enumerate(row.student_offsets) if a in (10, 11)]
    assert [row.student_offsets[i] for i in e] == [(10, 11), (11, 12)] and row.text[10:12].decode() == "é"
    # teacher tokens: their bytes (through an independent byte table) are the text at their offsets
    for piece, (a, b) in zip(bytes_of_pieces(BPE, row.teacher_ids), row.teacher_offsets):
        assert row.text[a:b] == piece
    # learned: the response and <eos>, never <bos> or the prompt
    assert row.student_learned == [False] * 4 + [True] * 15
    assert row.teacher_learned == [False] * 4 + [True] * 8
    assert aligned.teacher_batch["labels"].tolist() == [[-100] * 4 + row.teacher_ids[4:]]


def test_bpe_student_byte_teacher_is_the_mirror_image():
    batch = collate_pairs(PAIRS[:1], BPE)
    row = CrossTokenizerAligner(BPE, BYTE)(batch).rows[0]
    assert row.student_offsets == BPE_OFFSETS
    assert row.teacher_ids == own_row(BYTE, *PAIRS[0])[0]
    assert row.teacher_offsets == BYTE_OFFSETS
    assert [(s.student_start, s.student_end) for s in row.spans] == BPE_SPANS
    assert [(s.teacher_start, s.teacher_end) for s in row.spans] == BYTE_SPANS


def test_span_ids_follow_the_logit_positions():
    aligned = CrossTokenizerAligner(BYTE, BPE)(collate_pairs(PAIRS[:1], BYTE))
    s_span, t_span = aligned.student_span[0].tolist(), aligned.teacher_span[0].tolist()
    for k, ((s0, s1), (t0, t1)) in enumerate(zip(BYTE_SPANS, BPE_SPANS)):  # token i at position i - 1
        assert [p for p, x in enumerate(s_span) if x == k] == list(range(s0 - 1, s1 - 1))
        assert [p for p, x in enumerate(t_span) if x == k] == list(range(t0 - 1, t1 - 1))
    assert aligned.num_spans.tolist() == [7]
    assert s_span[:3] == [-1] * 3 and s_span[-1] == -1  # the prompt and <eos> are in no span


# ---- the teacher's features against the teacher run alone -------------------------------------


@pytest.mark.parametrize("student_tok, teacher_tok", [(BYTE, BPE), (BPE, BYTE)], ids=["byte-bpe", "bpe-byte"])
def test_features_equal_the_teacher_run_alone_on_its_own_tokenization(student_tok, teacher_tok):
    model = lm(teacher_tok, seed=1)
    teacher = CrossTokenizerTeacher(model, teacher_tok, student_tok)
    batch = collate_pairs(PAIRS, student_tok)
    out = teacher(batch)
    f = out.features
    assert out.logits is None and teacher.calls == 1
    T = batch["input_ids"].shape[1]
    for b, (prompt, response) in enumerate(PAIRS):
        ids, r = own_row(teacher_tok, prompt, response)
        assert teacher.last.rows[b].teacher_ids == ids
        logp = run_alone(model, ids)  # (n - 1, V_t)
        s_ids, s_r = own_row(student_tok, prompt, response)
        s_pos = list(range(s_r - 1, len(s_ids) - 1))  # positions predicting the response and <eos>
        t_pos = list(range(r - 1, len(ids) - 1))
        k = min(len(s_pos), len(t_pos))
        expected_mask = torch.zeros(T - 1, dtype=torch.bool)
        expected_mask[s_pos[:k]] = True
        assert torch.equal(f[ULD_MASK][b], expected_mask)
        torch.testing.assert_close(f[ULD_TEACHER_LOGP][b, s_pos[:k]], logp[t_pos[:k]], atol=1e-5, rtol=1e-5)
        assert not f[ULD_TEACHER_LOGP][b, ~expected_mask].any()  # zeros off the pairs (padding included)
        # the teacher's log-probability of each actual next token, and each span's sum of them
        token_logp = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(f[TEACHER_TOKEN_LOGP][b, : len(ids) - 1], token_logp, atol=1e-5, rtol=1e-5)
        assert not f[TEACHER_TOKEN_LOGP][b, len(ids) - 1 :].any()
        spans = teacher.last.rows[b].spans
        assert int(f[NUM_SPANS][b]) == len(spans) > 0
        for j, span in enumerate(spans):
            by_hand = sum(float(logp[i - 1, ids[i]]) for i in range(span.teacher_start, span.teacher_end))
            got = f[TEACHER_TOKEN_LOGP][b][f[TEACHER_SPAN][b] == j].sum()
            assert got.item() == pytest.approx(by_hand, abs=1e-4)
            s_positions = (f[STUDENT_SPAN][b] == j).nonzero().squeeze(-1).tolist()
            assert s_positions == list(range(span.student_start - 1, span.student_end - 1))
        # both sides of each span cover the same bytes, and the spans tile the response (every BPE cut is a
        # byte cut)
        row = teacher.last.rows[b]
        extents = []
        for span in spans:
            s_ext = (row.student_offsets[span.student_start][0], row.student_offsets[span.student_end - 1][1])
            t_ext = (row.teacher_offsets[span.teacher_start][0], row.teacher_offsets[span.teacher_end - 1][1])
            assert s_ext == t_ext
            extents.append(s_ext)
        ((start, end),) = row.learned_ranges
        assert extents[0][0] == start and extents[-1][1] == end == len(row.text)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(extents))


def test_padding_does_not_leak_into_any_feature():
    model = lm(BPE, seed=2)
    teacher = CrossTokenizerTeacher(model, BPE, BYTE)
    batch = collate_pairs(PAIRS, BYTE)
    full = teacher(batch).features
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = noisy["attention_mask"] == 0
    assert pad.any()
    noisy["input_ids"][pad] = 77  # any ids under the padding
    again = teacher(noisy).features
    for key in full:
        assert torch.equal(full[key], again[key]), key
    for b in range(len(PAIRS)):  # each row as a batch of its own gives the same features
        n = int(batch["attention_mask"][b].sum())
        alone = teacher({k: v[b : b + 1, :n] for k, v in batch.items()}).features
        torch.testing.assert_close(
            alone[ULD_TEACHER_LOGP][0], full[ULD_TEACHER_LOGP][b, : n - 1], atol=1e-5, rtol=1e-5
        )
        nt = alone[TEACHER_TOKEN_LOGP].shape[1]
        torch.testing.assert_close(
            alone[TEACHER_TOKEN_LOGP][0], full[TEACHER_TOKEN_LOGP][b, :nt], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(alone[STUDENT_SPAN][0], full[STUDENT_SPAN][b, : n - 1])
        assert not full[ULD_MASK][b, n - 1 :].any() and (full[STUDENT_SPAN][b, n - 1 :] == -1).all()
    assert teacher.calls == 2 + len(PAIRS)


def test_the_teacher_is_frozen_and_runs_once_per_batch():
    model = lm(BPE, seed=3)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    teacher = CrossTokenizerTeacher(model, BPE, BYTE)
    assert teacher.module is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    out = teacher(collate_pairs(PAIRS, BYTE))
    assert len(forwards) == 1 and teacher.calls == 1
    assert all(not v.requires_grad for v in out.features.values())
    assert out.features[ULD_TEACHER_LOGP].dtype == torch.float32
    teacher(collate_pairs(PAIRS[:1], BYTE))
    assert len(forwards) == 2 and teacher.calls == 2
    state = teacher.state_dict()
    fresh = CrossTokenizerTeacher(model, BPE, BYTE)
    fresh.load_state_dict(state)
    assert fresh.calls == 2
    assert teacher.to("cpu") is teacher


def test_outputs_select_the_features():
    teacher = CrossTokenizerTeacher(lm(BPE), BPE, BYTE, outputs=("span",))
    f = teacher(collate_pairs(PAIRS, BYTE)).features
    assert set(f) == {TEACHER_TOKEN_LOGP, TEACHER_SPAN, STUDENT_SPAN, NUM_SPANS}
    with pytest.raises(ValueError, match="subset of uld, span"):
        CrossTokenizerTeacher(lm(BPE), BPE, BYTE, outputs=("logits",))


# ---- multi-byte characters, bos, truncation ------------------------------------------------------


def test_a_row_cut_inside_a_character_gives_the_teacher_its_complete_characters():
    # max_length cuts the byte student's response inside "é" (bytes c3 a9): <bos> "ab" "caf" + c3
    batch = collate_pairs([("ab", "café")], BYTE, max_length=7)
    assert batch["input_ids"].shape[1] == 7
    row = CrossTokenizerAligner(BYTE, BPE)(batch).rows[0]
    assert row.text == b"abcaf" + b"\xc3"
    assert row.teacher_ids == own_row(BPE, "ab", "caf")[0][:-1]  # no <eos>: the response was cut
    assert all(b <= 5 for _, b in row.teacher_offsets)
    assert all(s.student_end <= 6 for s in row.spans)  # the lone byte c3 is in no span
    assert utf8_pieces(b"\xa9ab\xe2\x80") == [(1, 3)]


def test_bytes_that_are_not_text_are_skipped_by_the_teacher_and_by_the_spans():
    # a sampled response may hold a byte no character can start with (0xff): "ca", 0xff, "t"
    ids = [
        BOS,
        *BYTE("x ", add_special_tokens=False)["input_ids"],
        *BYTE("ca", add_special_tokens=False)["input_ids"],
    ]
    ids += [3 + 0xFF, *BYTE("t", add_special_tokens=False)["input_ids"], EOS]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[-100] * 3 + ids[3:]])}
    row = CrossTokenizerAligner(BYTE, BPE)(batch).rows[0]
    assert row.text == b"x ca\xfft"
    p, c, t = (BPE(x, add_special_tokens=False)["input_ids"] for x in ("x ", "ca", "t"))
    assert row.teacher_ids == [BOS, *p, *c, *t, EOS]
    assert all(not (a <= 4 < b) for a, b in row.teacher_offsets)  # no teacher token covers byte 4
    extents = [
        (row.student_offsets[s.student_start][0], row.student_offsets[s.student_end - 1][1])
        for s in row.spans
    ]
    assert extents and all(not (a <= 4 < b) for a, b in extents)
    assert [
        (row.teacher_offsets[s.teacher_start][0], row.teacher_offsets[s.teacher_end - 1][1])
        for s in row.spans
    ] == extents


def test_add_bos_controls_the_teacher_rows_start():
    batch = collate_pairs(PAIRS[:1], BYTE)
    plain = CrossTokenizerAligner(BYTE, BPE)(batch).rows[0].teacher_ids
    assert plain[0] == BOS
    no_bos = CrossTokenizerAligner(BYTE, BPE, add_bos=False)(batch).rows[0]
    assert no_bos.teacher_ids == plain[1:] and not no_bos.teacher_learned[0]
    packed = {k: v[:, 1:] for k, v in batch.items()}  # a student row without <bos>
    assert CrossTokenizerAligner(BYTE, BPE)(packed).rows[0].teacher_ids[0] != BOS
    assert CrossTokenizerAligner(BYTE, BPE, add_bos=True)(packed).rows[0].teacher_ids == plain
    cut = CrossTokenizerAligner(BYTE, BPE, max_length=5)(batch)
    assert cut.rows[0].teacher_ids == plain[:5] and cut.teacher_batch["input_ids"].shape[1] == 5


def test_a_tokenizer_that_is_not_byte_level_is_read_by_re_encoding_and_refused_when_ids_differ():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from distillery.data.text.tokenizer import SPECIAL_TOKENS, wrap_tokenizer

    raw = Tokenizer(models.BPE(unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    raw.decoder = decoders.Metaspace(prepend_scheme="never")
    raw.train_from_iterator(
        [CORPUS], trainers.BpeTrainer(vocab_size=120, special_tokens=list(SPECIAL_TOKENS))
    )
    meta = wrap_tokenizer(raw)
    batch = collate_pairs([("the ", "café cat")], meta)
    row = CrossTokenizerAligner(meta, BYTE)(batch).rows[0]
    assert row.text == "the café cat".encode()
    for i, (a, b) in zip(batch["input_ids"][0].tolist(), row.student_offsets):
        piece = meta.convert_ids_to_tokens(i)
        assert row.text[a:b].decode() == ("" if i in (BOS, EOS) else piece.replace("▁", " "))
    assert row.teacher_ids == own_row(BYTE, "the ", "café cat")[0] and row.spans
    # ids that re-encoding the text would not give (one character at a time) cannot be read
    chars = [meta.convert_tokens_to_ids(c) for c in "cat"]
    assert len(chars) == 3 and chars != meta("cat", add_special_tokens=False)["input_ids"]
    odd = {"input_ids": torch.tensor([[BOS, *chars]]), "labels": torch.tensor([[-100, *chars]])}
    with pytest.raises(ValueError, match="cannot be\\s+recovered|offsets cannot be recovered"):
        CrossTokenizerAligner(meta, BYTE)(odd)


# ---- the loss terms ---------------------------------------------------------------------------


def inputs_for(student: nn.Module, teacher: CrossTokenizerTeacher, batch) -> LossInputs:
    adapter = HFCausalLMAdapter()
    s_out = adapter.forward(student, batch)
    t_out = teacher(batch, s_out)
    target, mask = adapter.rows(batch)
    return LossInputs(
        student_logits=s_out.logits, target=target, mask=mask, teacher_logits=t_out.logits,
        teacher_features=t_out.features,
    )  # fmt: skip


@pytest.mark.parametrize("student_tok, teacher_tok", [(BYTE, BPE), (BPE, BYTE)], ids=["byte-bpe", "bpe-byte"])
def test_both_terms_are_finite_and_only_the_student_gets_gradients(student_tok, teacher_tok):
    student, t_model = lm(student_tok, seed=4).train(), lm(teacher_tok, seed=5)
    teacher = CrossTokenizerTeacher(t_model, teacher_tok, student_tok)
    batch = collate_pairs(PAIRS, student_tok)
    terms = {"uld": UldLoss(), "span": SpanLikelihoodLoss(), "span_abs": SpanLikelihoodLoss("abs")}
    for name, term in terms.items():
        student.zero_grad()
        inputs = inputs_for(student, teacher, batch)
        value = term(inputs, term.counts(inputs.target, inputs.mask))
        assert torch.isfinite(value) and value.item() > 0, name
        value.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        assert all(p.grad is None for p in t_model.parameters()), name


def test_uld_term_is_the_sum_over_pairs_divided_by_the_students_learned_targets():
    student, teacher = lm(BYTE, seed=6), CrossTokenizerTeacher(lm(BPE, seed=7), BPE, BYTE)
    inputs = inputs_for(student, teacher, collate_pairs(PAIRS, BYTE))
    term = UldLoss(temperature=2.0, teacher_temperature=0.5)
    rows = term.rows(inputs.target, inputs.mask)
    assert torch.equal(rows, inputs.target != -100)
    pairs = inputs.teacher_features[ULD_MASK]
    assert pairs.sum() < rows.sum()  # the BPE teacher's responses are the shorter
    per = uld_loss(inputs.student_logits, inputs.teacher_features[ULD_TEACHER_LOGP], 2.0,
                   teacher_temperature=0.5, mask=pairs, reduction="sum")  # fmt: skip
    torch.testing.assert_close(term(inputs), per / rows.sum())
    torch.testing.assert_close(term(inputs, torch.tensor(100.0, dtype=torch.float64)), per / 100)
    # two micro-batches with the global count add up to the one batch
    halves = [inputs_for(student, teacher, collate_pairs(p, BYTE)) for p in (PAIRS[:1], PAIRS[1:])]
    total = sum(term(h, rows.sum()) for h in halves)
    torch.testing.assert_close(total, term(inputs), atol=1e-6, rtol=1e-5)


def test_span_term_is_the_mean_over_spans_scaled_by_the_rows_share():
    student, teacher = lm(BPE, seed=8), CrossTokenizerTeacher(lm(BYTE, seed=9), BYTE, BPE)
    inputs = inputs_for(student, teacher, collate_pairs(PAIRS, BPE))
    f = inputs.teacher_features
    term = SpanLikelihoodLoss(kind="binary_ce", binarization_temperature=10.0)
    s_logp = torch.log_softmax(inputs.student_logits, -1).gather(-1, inputs.target.clamp_min(0).unsqueeze(-1))
    expected = span_likelihood_loss(
        s_logp.squeeze(-1), f[TEACHER_TOKEN_LOGP], f[STUDENT_SPAN], f[TEACHER_SPAN], int(f[NUM_SPANS].max()),
        kind="binary_ce", binarization_temperature=10.0,
    )  # fmt: skip
    n = term.rows(inputs.target, inputs.mask).sum()
    torch.testing.assert_close(term(inputs), expected)
    torch.testing.assert_close(term(inputs, n), expected)
    torch.testing.assert_close(term(inputs, 2 * n), expected / 2)


def test_row_weights_scale_each_rows_pairs_and_spans():
    student, teacher = lm(BYTE, seed=12), CrossTokenizerTeacher(lm(BPE, seed=13), BPE, BYTE)
    inputs = inputs_for(student, teacher, collate_pairs(PAIRS, BYTE))
    rows = inputs.target != -100
    for term in (UldLoss(), SpanLikelihoodLoss()):
        plain = term(inputs, rows.sum())
        inputs.row_weight = torch.ones(len(PAIRS))
        torch.testing.assert_close(term(inputs, rows.sum()), plain)
        # weight 0 on the first row: the other rows' parts over the same normaliser
        inputs.row_weight = torch.tensor([0.0, 1.0, 1.0])
        weighted = term(inputs, rows.sum())
        inputs.row_weight = None
        rest = inputs_for(student, teacher, collate_pairs(PAIRS[1:], BYTE))
        if isinstance(term, UldLoss):
            torch.testing.assert_close(weighted, term(rest, rows.sum()), atol=1e-6, rtol=1e-5)
        else:  # the mean over the other rows' spans, divided by all the spans, scaled by the rows' share
            f = inputs.teacher_features
            n_all, n_rest = int(f[NUM_SPANS].sum()), int(f[NUM_SPANS][1:].sum())
            expected = term(rest) * n_rest / n_all
            torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=1e-5)


def test_terms_refuse_outputs_without_the_cross_tokenizer_features():
    inputs = LossInputs(student_logits=torch.zeros(1, 3, 5), target=torch.zeros(1, 3, dtype=torch.long),
                        mask=torch.ones(1, 3, dtype=torch.bool), teacher_logits=torch.zeros(1, 3, 5))  # fmt: skip
    for term in (UldLoss(), SpanLikelihoodLoss()):
        with pytest.raises(ValueError, match="CrossTokenizerTeacher"):
            term(inputs)
    with pytest.raises(ValueError, match="kind"):
        SpanLikelihoodLoss(kind="l2")


def test_configs_build_the_terms_and_mark_them_cross_tokenizer():
    assert set(CROSS_TOKENIZER_LOSSES) == {"uld", "span_likelihood"}
    for name, (cfg_cls, term_cls) in CROSS_TOKENIZER_LOSSES.items():
        assert LOSSES[name] == (cfg_cls, term_cls)
        assert term_cls.cross_tokenizer is True and cfg_cls.cross_tokenizer is True and term_cls.needs_teacher
    term = build_loss(UldConfig(weight=0.5, temperature=2.0))
    assert isinstance(term, UldLoss) and term.temperature == 2.0 and term.teacher_temperature is None
    term = build_loss(SpanLikelihoodConfig(kind="abs", binarization_temperature=3.0))
    assert isinstance(term, SpanLikelihoodLoss) and (term.kind, term.binarization_temperature) == ("abs", 3.0)
    assert not getattr(LOSSES["forward_kl"][1], "cross_tokenizer", False)


# ---- training ----------------------------------------------------------------------------------


def test_a_few_steps_of_uld_against_a_fixed_teacher_reduce_the_loss():
    student, t_model = lm(BPE, seed=10).train(), lm(BYTE, seed=11)
    teacher = CrossTokenizerTeacher(t_model, BYTE, BPE)
    objective = Objective({"uld": UldLoss(), "span": SpanLikelihoodLoss()}, {"uld": 1.0, "span": 0.0})
    batch = collate_pairs(PAIRS, BPE)
    adapter = HFCausalLMAdapter()
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    before = [p.clone() for p in t_model.parameters()]
    losses = []
    for _ in range(8):
        target, mask = adapter.rows(batch)
        s_out = adapter.forward(student, batch)
        t_out = teacher(batch, s_out)
        inputs = LossInputs(s_out.logits, target, mask, teacher_features=t_out.features)
        parts = objective(inputs, objective.counts(target, mask))
        loss = objective.total(parts, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["uld"].item())
    assert losses[-1] < 0.8 * losses[0]
    assert teacher.calls == 8
    assert all(torch.equal(a, b) for a, b in zip(before, t_model.parameters()))


class _Pairs:
    """A training set of prompt/response pairs, collated by the student's tokenizer."""

    def __init__(self, pairs, tokenizer) -> None:
        self.pairs, self.tokenizer = pairs, tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def get_batch(self, indices):
        return collate_pairs([self.pairs[int(i)] for i in indices], self.tokenizer)


def test_the_loop_with_gradient_accumulation_gives_the_one_batch_uld_step():
    """Through ``fit``: one SGD step over 4 rows as one batch or as two micro-batches of 2 (each
    padded to its own width) moves the student alike; the teacher runs once per micro-batch."""
    from distillery.train import TrainConfig, fit

    data = _Pairs([*PAIRS, ("Q: ", "a cat")], BPE)
    results, calls = [], []
    for accum in (1, 2):
        teacher = CrossTokenizerTeacher(lm(BYTE, seed=14), BYTE, BPE)
        cfg = TrainConfig(
            steps=1, batch_size=4, grad_accum=accum, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
            schedule={"name": "constant"}, eval_every=0, log_every=1,
        )  # fmt: skip
        objective = Objective({"uld": UldLoss()})
        out = fit(
            lm(BPE, seed=15),
            data,
            objective,
            cfg,
            teacher=teacher,
            adapter=HFCausalLMAdapter(),
            progress=False,
        )
        results.append([p.detach().clone() for p in out.model.parameters()])
        calls.append(teacher.calls)
    assert calls == [1, 2]
    start = list(lm(BPE, seed=15).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(results[0], start))  # the step moved the student
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
