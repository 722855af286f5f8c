"""attention_kl, self_relation_kl / value_relation_kl and attention_score_mse against naive loops.

Then the shared conventions of the attention functions: padding never contributes (its values can
be anything, NaN and -inf included), reductions, gradients, dtypes and the errors. The references
at the end of this file use Python lists, loops and the math module only.
"""

import math
import zlib

import pytest
import torch

from distillery.functional import attention_kl, attention_score_mse, self_relation_kl, value_relation_kl

EPS = 1e-12


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _token_mask(batch, length, g, *, all_padding_row=False):
    """Random ``[B, L]`` padding masks: each sequence keeps a random prefix (at least one token)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if all_padding_row and batch > 1:
        mask[-1] = False
    return mask


def _random_probs(batch, heads, length, g):
    """Attention rows softmax-ed over *all* keys, so that renormalising over valid keys matters."""
    return torch.softmax(torch.randn(batch, heads, length, length, generator=g, dtype=torch.float64) * 2, -1)


# (B, A, L)
ATTENTION_SHAPES = [(1, 1, 1), (2, 3, 4), (3, 2, 5), (2, 4, 7)]


# ---------------------------------------------------------------------------------------------
# attention_kl (MiniLM)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", ATTENTION_SHAPES)
@pytest.mark.parametrize("masking", ["none", "prefix", "with_an_all_padding_sequence"])
def test_attention_kl_matches_the_naive_loops(dims, masking):
    b, a, length = dims
    g = _seed(dims, masking)
    s, t = _random_probs(b, a, length, g), _random_probs(b, a, length, g)
    mask = None if masking == "none" else _token_mask(b, length, g, all_padding_row=masking != "prefix")
    valid = [[True] * length for _ in range(b)] if mask is None else mask.tolist()
    per_row = naive_attention_kl(s.tolist(), t.tolist(), valid, renormalise=mask is not None)
    _check_query_reductions(lambda **kw: attention_kl(s, t, mask=mask, **kw), per_row, valid)


def test_attention_kl_is_zero_for_equal_rows_and_positive_otherwise():
    g = _seed("kl-props")
    p = _random_probs(2, 3, 5, g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert attention_kl(p, p.clone()).abs().item() < 1e-15
    assert attention_kl(p, p.clone(), mask=mask).abs().item() < 1e-15
    assert (attention_kl(_random_probs(2, 3, 5, g), p, reduction="none") > 0).all()
    # A teacher with zero mass on some keys: those keys add nothing (no NaN, no -inf).
    t = p.clone()
    t[..., 0] = 0.0
    t = t / t.sum(-1, keepdim=True)
    out = attention_kl(p, t, reduction="none")
    assert torch.isfinite(out).all() and (out > 0).all()


def test_attention_kl_with_an_underflowed_student_is_floored_at_eps():
    t = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]], dtype=torch.float64)
    s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], dtype=torch.float64)
    want = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(1e-6))
    got = attention_kl(s, t, eps=1e-6, reduction="none")
    assert got[0, 0, 0].item() == pytest.approx(want, rel=1e-14) and got[0, 0, 1].item() == 0.0


def test_attention_kl_gradcheck_on_both_sides():
    g = _seed("kl-grad")
    s = _random_probs(2, 2, 4, g).requires_grad_()
    t = _random_probs(2, 2, 4, g).requires_grad_()
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x, y: attention_kl(x, y, mask=mask), (s, t))
    assert torch.autograd.gradcheck(lambda x, y: attention_kl(x, y, reduction="none"), (s, t))


def test_attention_kl_padding_changes_nothing():
    g = _seed("kl-padding")
    s, t = _random_probs(3, 2, 6, g), _random_probs(3, 2, 6, g)
    mask = _token_mask(3, 6, g, all_padding_row=True)
    s2, t2 = s.clone(), t.clone()
    pad_q = ~mask[:, None, :, None]  # padding query rows
    pad_k = ~mask[:, None, None, :]  # padding key columns
    s2 = s2.masked_fill(pad_q.expand_as(s2), float("nan")).masked_fill(pad_k.expand_as(s2), 0.7)
    t2 = t2.masked_fill(pad_q.expand_as(t2), 5.0).masked_fill(pad_k.expand_as(t2), float("nan"))
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            attention_kl(s, t, mask=mask, reduction=reduction),
            attention_kl(s2, t2, mask=mask, reduction=reduction),
        )
    x = s2.clone().requires_grad_()
    attention_kl(x, t2, mask=mask).backward()
    assert torch.isfinite(x.grad).all()
    assert not x.grad.masked_select(pad_q.expand_as(x) | pad_k.expand_as(x)).any()


def test_attention_kl_equals_the_relation_kl_of_its_own_softmax():
    """Attention built as softmax(X_a X_a^T / sqrt(d)) with -inf at padding keys is a self-relation."""
    g = _seed("kl-vs-relation")
    b, length, heads, d_s, d_t = 2, 5, 3, 4, 2
    x_s = torch.randn(b, length, heads * d_s, generator=g, dtype=torch.float64)
    x_t = torch.randn(b, length, heads * d_t, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def probs(x, d):
        split = x.view(b, length, heads, d).permute(0, 2, 1, 3)  # Hugging Face's head split
        scores = split @ split.transpose(-1, -2) / math.sqrt(d)
        return torch.softmax(scores.masked_fill(~mask[:, None, None, :], -math.inf), -1)

    want = self_relation_kl(x_s, x_t, num_relation_heads=heads, mask=mask, reduction="none")
    got = attention_kl(probs(x_s, d_s), probs(x_t, d_t), mask=mask, reduction="none")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# self_relation_kl / value_relation_kl (MiniLMv2 / MiniLM)
# ---------------------------------------------------------------------------------------------

# (B, L, D_s, D_t, R): R is free of any model's head count, and D_s != D_t
RELATION_SHAPES = [(1, 1, 2, 2, 1), (2, 4, 6, 8, 2), (3, 5, 12, 6, 3), (2, 6, 8, 16, 4), (2, 3, 8, 12, 4)]


@pytest.mark.parametrize("dims", RELATION_SHAPES)
@pytest.mark.parametrize("masking", ["none", "prefix", "with_an_all_padding_sequence"])
def test_self_relation_kl_matches_the_naive_loops(dims, masking):
    b, length, d_s, d_t, r = dims
    g = _seed(dims, masking)
    s = torch.randn(b, length, d_s, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, length, d_t, generator=g, dtype=torch.float64) * 2
    mask = None if masking == "none" else _token_mask(b, length, g, all_padding_row=masking != "prefix")
    valid = [[True] * length for _ in range(b)] if mask is None else mask.tolist()
    per_row = naive_relation_kl(s.tolist(), t.tolist(), r, valid)
    _check_query_reductions(
        lambda **kw: self_relation_kl(s, t, num_relation_heads=r, mask=mask, **kw), per_row, valid
    )


def test_value_relation_kl_is_self_relation_kl_with_the_head_count():
    g = _seed("value")
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            value_relation_kl(s, t, num_heads=4, mask=mask, reduction=reduction),
            self_relation_kl(s, t, num_relation_heads=4, mask=mask, reduction=reduction),
        )


def test_self_relation_kl_relation_heads_are_free_of_the_models_head_counts():
    """A 2-head student (D=8) against a 3-head teacher (D=12): any R dividing 8 and 12 works."""
    g = _seed("free-heads")
    s, t = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 12, generator=g)
    for r in (1, 2, 4):
        out = self_relation_kl(s, t, num_relation_heads=r, reduction="none")
        assert out.shape == (2, r, 4) and (out > 0).all()
    # The relation only depends on X X^T: an orthogonal map of the width changes nothing (R = 1).
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    t64 = t.double()
    assert torch.allclose(
        self_relation_kl(s.double(), t64, num_relation_heads=1),
        self_relation_kl(s.double(), t64 @ q, num_relation_heads=1),
        rtol=1e-10,
    )
    assert self_relation_kl(t, t.clone(), num_relation_heads=3).abs().item() < 1e-6


def test_self_relation_kl_gradcheck_on_both_sides():
    g = _seed("rel-grad")
    s = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x, y: self_relation_kl(x, y, num_relation_heads=2, mask=mask), (s, t)
    )
    assert torch.autograd.gradcheck(
        lambda x, y: self_relation_kl(x, y, num_relation_heads=1, reduction="none"), (s, t)
    )


def test_self_relation_kl_padding_changes_nothing():
    g = _seed("rel-padding")
    s, t = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 4, generator=g)
    mask = _token_mask(3, 6, g, all_padding_row=True)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = float("nan"), float("inf")
    for reduction in ("mean", "sum", "none"):
        a = self_relation_kl(s, t, num_relation_heads=2, mask=mask, reduction=reduction)
        b = self_relation_kl(s2, t2, num_relation_heads=2, mask=mask, reduction=reduction)
        assert torch.equal(a, b)
    x = s2.clone().requires_grad_()
    self_relation_kl(x, t2, num_relation_heads=2, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and not x.grad[~mask].any()


# ---------------------------------------------------------------------------------------------
# attention_score_mse (TinyBERT)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", ATTENTION_SHAPES)
@pytest.mark.parametrize("masking", ["none", "prefix", "with_an_all_padding_sequence"])
def test_attention_score_mse_matches_the_naive_loops(dims, masking):
    b, a, length = dims
    g = _seed(dims, masking)
    s = torch.randn(b, a, length, length, generator=g, dtype=torch.float64) * 3
    t = torch.randn(b, a, length, length, generator=g, dtype=torch.float64) * 3
    mask = None if masking == "none" else _token_mask(b, length, g, all_padding_row=masking != "prefix")
    valid = [[True] * length for _ in range(b)] if mask is None else mask.tolist()
    entries, total, count = naive_score_mse(s.tolist(), t.tolist(), valid)
    assert attention_score_mse(s, t, mask=mask).item() == pytest.approx(total / max(count, 1), rel=1e-12)
    assert attention_score_mse(s, t, mask=mask, reduction="sum").item() == pytest.approx(total, rel=1e-12)
    none = attention_score_mse(s, t, mask=mask, reduction="none")
    assert none.shape == (b, a, length, length)
    for got, want in zip(none.reshape(-1).tolist(), entries):
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)


def test_attention_score_mse_against_tinyberts_official_averaging():
    """TinyBERT zeroes scores <= -100 and averages over all B A L^2 entries; here over the valid ones."""
    g = _seed("tinybert")
    b, a, length = 3, 2, 6
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    additive = (~mask[:, None, None, :]).double() * -10000.0  # BERT's extended attention mask
    s = torch.randn(b, a, length, length, generator=g, dtype=torch.float64) + additive
    t = torch.randn(b, a, length, length, generator=g, dtype=torch.float64) + additive

    def official(x, y):
        x = torch.where(x <= -1e2, torch.zeros_like(x), x)
        y = torch.where(y <= -1e2, torch.zeros_like(y), y)
        return torch.nn.functional.mse_loss(x, y)

    # Without padding the two agree exactly.
    full = torch.ones(b, length, dtype=torch.bool)
    s0, t0 = s.masked_fill(additive < 0, 0.3), t.masked_fill(additive < 0, -0.2)
    assert attention_score_mse(s0, t0).item() == pytest.approx(official(s0, t0).item(), rel=1e-14)
    assert attention_score_mse(s0, t0, mask=full).item() == pytest.approx(official(s0, t0).item(), rel=1e-14)
    # With padding the official code also keeps (padding query, valid key) entries; drop those rows
    # and the two differ only by the denominator.
    s1 = s.masked_fill(~mask[:, None, :, None], 0.0)
    t1 = t.masked_fill(~mask[:, None, :, None], 0.0)
    count = a * sum(int(n) ** 2 for n in mask.sum(-1))
    ours = attention_score_mse(s, t, mask=mask).item()
    assert ours * count / (b * a * length * length) == pytest.approx(official(s1, t1).item(), rel=1e-12)


def test_attention_score_mse_padding_changes_nothing_and_inf_padding_is_safe():
    g = _seed("mse-padding")
    s, t = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    mask = _token_mask(3, 5, g, all_padding_row=True)
    pad = ~(mask[:, :, None] & mask[:, None, :]).unsqueeze(1).expand_as(s)
    s2 = s.masked_fill(pad, -math.inf)
    t2 = t.masked_fill(pad, float("nan"))
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            attention_score_mse(s, t, mask=mask, reduction=reduction),
            attention_score_mse(s2, t2, mask=mask, reduction=reduction),
        )
    x = s2.clone().requires_grad_()
    attention_score_mse(x, t2, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and not x.grad[pad].any()


def test_attention_score_mse_gradcheck_on_both_sides():
    g = _seed("mse-grad")
    s = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x, y: attention_score_mse(x, y, mask=mask), (s, t))
    assert torch.autograd.gradcheck(lambda x, y: attention_score_mse(x, y, reduction="none"), (s, t))


# ---------------------------------------------------------------------------------------------
# Shared conventions: no valid token, dtypes, errors
# ---------------------------------------------------------------------------------------------


def _calls():
    g = _seed("calls")
    probs = (_random_probs(2, 2, 3, g).float(), _random_probs(2, 2, 3, g).float())
    scores = (torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g))
    states = (torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g))
    return [
        (attention_kl, probs, {}),
        (attention_score_mse, scores, {}),
        (self_relation_kl, states, {"num_relation_heads": 2}),
        (value_relation_kl, states, {"num_heads": 2}),
    ]


@pytest.mark.parametrize("index", range(4))
def test_no_valid_token_gives_zero_with_zero_gradient_and_float32(index):
    fn, (s, t), kw = _calls()[index]
    x = s.clone().requires_grad_()
    out = fn(x, t, mask=torch.zeros(2, 3, dtype=torch.bool), **kw)
    out.backward()
    assert out.item() == 0.0 and not x.grad.any()
    assert fn(s, t, mask=torch.zeros(2, 3, dtype=torch.bool), reduction="sum", **kw).item() == 0.0
    assert fn(s.half(), t.half(), **kw).dtype == torch.float32
    assert fn(s.double(), t.double(), **kw).dtype == torch.float64
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); expected \[B, L\] = \(2, 3\)"):
        fn(s, t, mask=torch.ones(2, 4, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="reduction"):
        fn(s, t, reduction="batchmean", **kw)


def test_attention_shape_errors_name_both_shapes_and_the_fix():
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 6, 3, 3\).*self_relation_kl"):
        attention_kl(torch.rand(2, 4, 3, 3), torch.rand(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 6, 3, 3\).*self_relation_kl"):
        attention_score_mse(torch.rand(2, 4, 3, 3), torch.rand(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, A, L, L\]"):
        attention_kl(torch.rand(2, 4, 3, 2), torch.rand(2, 4, 3, 2))
    with pytest.raises(ValueError, match=r"\[B, A, L, L\]"):
        attention_score_mse(torch.rand(4, 3, 3), torch.rand(4, 3, 3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        attention_kl(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), eps=0.0)


def test_relation_errors_name_the_width_and_the_head_count():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match=r"teacher's width D=12.*num_relation_heads=5.*D_s=10 and D_t=12"):
        self_relation_kl(torch.randn(2, 3, 10), t, num_relation_heads=5)
    with pytest.raises(ValueError, match=r"student's width D=8.*num_relation_heads=3"):
        self_relation_kl(s, t, num_relation_heads=3)
    with pytest.raises(ValueError, match=r"student's width D=8.*num_relation_heads=3"):
        value_relation_kl(s, t, num_heads=3)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*\(2, 4, 12\).*\[B, L\]"):
        self_relation_kl(s, torch.randn(2, 4, 12), num_relation_heads=4)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        self_relation_kl(torch.randn(3, 8), torch.randn(3, 8), num_relation_heads=2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_relation_heads"):
            self_relation_kl(s, t, num_relation_heads=bad)


# ---------------------------------------------------------------------------------------------
# Naive references (float64 Python loops, no vectorised torch maths) and the reduction check
# ---------------------------------------------------------------------------------------------


def naive_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    total = sum(e)
    return [v / total for v in e]


def naive_kl(p, q, eps=0.0):
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(max(qi, eps)))
    return total


def naive_attention_kl(s, t, valid, renormalise, eps=EPS):
    """``[B][A][L]``: KL(t || s) of each row over the valid keys (renormalised), 0 at padding queries."""
    out = []
    for b in range(len(s)):
        keys = [j for j, ok in enumerate(valid[b]) if ok]
        per_head = []
        for a in range(len(s[b])):
            row_values = []
            for i in range(len(valid[b])):
                if not valid[b][i]:
                    row_values.append(0.0)
                    continue
                p_t = [t[b][a][i][j] for j in keys]
                p_s = [s[b][a][i][j] for j in keys]
                if renormalise:
                    sum_t, sum_s = max(sum(p_t), eps), max(sum(p_s), eps)
                    p_t, p_s = [v / sum_t for v in p_t], [v / sum_s for v in p_s]
                row_values.append(naive_kl(p_t, p_s, eps))
            per_head.append(row_values)
        out.append(per_head)
    return out


def naive_relations(x, r, keys, i):
    """Query row ``i`` of each relation head: softmax over the valid keys of <x_i, x_j>_r / sqrt(d_r)."""
    size = len(x[0]) // r
    rows = []
    for head in range(r):
        lo, hi = head * size, (head + 1) * size
        scores = []
        for j in keys:
            dot = 0.0
            for d in range(lo, hi):
                dot += x[i][d] * x[j][d]
            scores.append(dot / math.sqrt(size))
        rows.append(naive_softmax(scores))
    return rows


def naive_relation_kl(s, t, r, valid):
    """``[B][R][L]``: KL(teacher relation || student relation) per query row, 0 at padding queries."""
    out = []
    for b in range(len(s)):
        keys = [j for j, ok in enumerate(valid[b]) if ok]
        per_head = [[0.0] * len(valid[b]) for _ in range(r)]
        for i in keys:
            rel_s, rel_t = naive_relations(s[b], r, keys, i), naive_relations(t[b], r, keys, i)
            for head in range(r):
                per_head[head][i] = naive_kl(rel_t[head], rel_s[head])
        out.append(per_head)
    return out


def naive_score_mse(s, t, valid):
    """Flattened ``[B, A, L, L]`` squared errors (0 off the valid pairs), their sum and count."""
    entries, total, count = [], 0.0, 0
    for b in range(len(s)):
        for a in range(len(s[b])):
            for i in range(len(valid[b])):
                for j in range(len(valid[b])):
                    if valid[b][i] and valid[b][j]:
                        e = (s[b][a][i][j] - t[b][a][i][j]) ** 2
                        total += e
                        count += 1
                    else:
                        e = 0.0
                    entries.append(e)
    return entries, total, count


def _check_query_reductions(call, per_row, valid):
    """``per_row`` ``[B][H][L]`` (0 at padding queries): mean over valid (b, h, query) rows, sum, none."""
    kept = [
        per_row[b][h][i]
        for b in range(len(per_row))
        for h in range(len(per_row[b]))
        for i in range(len(valid[b]))
        if valid[b][i]
    ]
    mean = sum(kept) / max(len(kept), 1)
    assert call().item() == pytest.approx(mean, rel=1e-10, abs=1e-15)
    assert call(reduction="sum").item() == pytest.approx(sum(kept), rel=1e-10, abs=1e-15)
    none = call(reduction="none")
    heads = len(per_row[0])
    assert none.shape == (len(per_row), heads, len(valid[0]))
    for b, per_head in enumerate(none.tolist()):
        for h, row_values in enumerate(per_head):
            for i, got in enumerate(row_values):
                if valid[b][i]:
                    assert got == pytest.approx(per_row[b][h][i], rel=1e-10, abs=1e-15)
                else:
                    assert got == 0.0
