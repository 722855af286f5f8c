"""Cross-tokenizer losses: ULD (sorted probability vectors) and ALM's span likelihood matching.

Checked against naive float64 loops written here from the papers' equations, over shapes with
different student and teacher vocabularies / sequence lengths, masks and reductions; by gradcheck;
by the closed-form properties (zero for equal distributions or likelihoods, invariance to permuting a
vocabulary, symmetry, bounds); then spans from ``aligned_spans`` end to end, and the errors.
"""

import math
import random

import pytest
import torch

from distillery.data.text.alignment import aligned_spans, span_index
from distillery.functional import span_likelihood_loss, uld_loss
from tests.unit.functional import reference as ref

_seed, _rows, _mask = ref.case_seed, ref.flat_rows, ref.random_mask


def _check(got, values, valid, reduction, num_valid=None):
    want = ref.reduce(values, valid, reduction, num_valid)
    if reduction == "none":
        want = torch.tensor(want, dtype=torch.float64)
        assert torch.allclose(got.double().reshape(-1), want, atol=1e-5, rtol=1e-4), (got, want)
    else:
        assert got.shape == ()
        assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-6), (got, want)


# ---------------------------------------------------------------- naive references


def uld_row(s, t, T_s, T_t):
    """sum_i |p_s sorted(i) - p_t sorted(i)|, the shorter vocabulary padded with zeros."""
    p = sorted(ref.softmax(s, T_s), reverse=True)
    q = sorted(ref.softmax(t, T_t), reverse=True)
    width = max(len(p), len(q))
    p += [0.0] * (width - len(p))
    q += [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def log1mexp(x):
    return math.log(-math.expm1(x))


def span_value(lt, ls, kind, tau, eps=1e-6):
    """ALM's divergence between the teacher's and the student's span log-likelihoods."""
    lt, ls = min(lt, 0.0), min(ls, 0.0)
    if kind == "abs":
        return abs(lt - ls)
    a, b = lt / tau - eps, ls / tau - eps
    p, q = math.exp(a), math.exp(b)
    if kind == "binary_ce":
        return -(p * math.log(q) + (1 - p) * log1mexp(b))
    return p * (math.log(p) - math.log(q)) + (1 - p) * (log1mexp(a) - log1mexp(b))


def span_values(s_logp, t_logp, s_span, t_span, num_spans, kind, tau):
    """Per (row, span) values and validity flags, by explicit loops over the tokens."""
    values, valid = [], []
    for ls_row, lt_row, ss_row, ts_row in zip(s_logp, t_logp, s_span, t_span):
        for k in range(num_spans):
            s_tokens = [v for v, j in zip(ls_row, ss_row) if j == k]
            t_tokens = [v for v, j in zip(lt_row, ts_row) if j == k]
            ok = bool(s_tokens) and bool(t_tokens)
            valid.append(ok)
            values.append(span_value(sum(t_tokens), sum(s_tokens), kind, tau) if ok else 0.0)
    return values, valid


# ---------------------------------------------------------------- ULD

ULD_SHAPES = [((5, 7), (5, 4)), ((2, 3, 6), (2, 3, 9)), ((4, 5), (4, 5))]


@pytest.mark.parametrize("shapes", ULD_SHAPES)
@pytest.mark.parametrize("temperatures", [(1.0, None), (2.0, 0.5)])
@pytest.mark.parametrize("masked", [False, True])
def test_uld_matches_naive_reference(shapes, temperatures, masked):
    g = torch.Generator().manual_seed(_seed("uld", shapes, temperatures, masked))
    s, t = torch.randn(shapes[0], generator=g) * 2, torch.randn(shapes[1], generator=g) * 2
    T, T_t = temperatures
    mask = _mask(shapes[0][:-1], g) if masked else None
    valid = [True] * s[..., 0].numel() if mask is None else mask.reshape(-1).tolist()
    values = [uld_row(a, b, T, T if T_t is None else T_t) for a, b in zip(_rows(s), _rows(t))]
    for reduction in ("mean", "sum", "none"):
        got = uld_loss(s, t, T, teacher_temperature=T_t, mask=mask, reduction=reduction)
        assert got.dtype == torch.float32
        if reduction == "none":
            assert got.shape == shapes[0][:-1]
        _check(got, values, valid, reduction)
    got = uld_loss(s, t, T, teacher_temperature=T_t, mask=mask, num_valid=11)
    _check(got, values, valid, "mean", num_valid=11)


def test_uld_gradcheck_float64_and_teacher_detached():
    g = torch.Generator().manual_seed(_seed("uld-gradcheck"))
    s = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(4, 9, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.tensor([True, False, True, True])
    for kw in ({}, {"mask": mask, "reduction": "none"}, {"temperature": 2.0, "teacher_temperature": 0.7}):
        assert torch.autograd.gradcheck(lambda x, kw=kw: uld_loss(x, t, **kw), (s,))
    uld_loss(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


def test_uld_properties():
    g = torch.Generator().manual_seed(_seed("uld-properties"))
    s, t = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 8, generator=g) * 2
    # Zero for the same distribution up to a relabelling, also across vocabularies of different sizes
    # (the teacher's extra ids have no mass).
    relabelled = torch.cat([s[:, torch.randperm(5, generator=g)], torch.full((6, 3), -math.inf)], -1)
    assert torch.allclose(uld_loss(s, relabelled, reduction="none"), torch.zeros(6), atol=1e-6)
    assert torch.allclose(uld_loss(s, s, reduction="none"), torch.zeros(6), atol=1e-7)
    # Invariant to permuting either vocabulary.
    base = uld_loss(s, t, reduction="none")
    s_perm, t_perm = s[:, torch.randperm(5, generator=g)], t[:, torch.randperm(8, generator=g)]
    assert torch.allclose(uld_loss(s_perm, t, reduction="none"), base, atol=1e-6)
    assert torch.allclose(uld_loss(s, t_perm, reduction="none"), base, atol=1e-6)
    # Symmetric when the vocabularies have the same size; in [0, 2] always.
    u = torch.randn(6, 5, generator=g) * 3
    assert torch.allclose(uld_loss(s, u, reduction="none"), uld_loss(u, s, reduction="none"), atol=1e-6)
    assert (base > 0).all() and (base <= 2).all()
    # The official code's padding, not truncation: the teacher's tail mass beyond V_s counts.
    flat_t = torch.zeros(1, 8)
    assert math.isclose(uld_loss(torch.zeros(1, 4), flat_t).item(), 4 * (1 / 4 - 1 / 8) + 4 / 8, rel_tol=1e-6)


def test_uld_no_valid_row_and_errors():
    s = torch.randn(3, 4, requires_grad=True)
    loss = uld_loss(s, torch.randn(3, 6), mask=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="leading"):
        uld_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="teacher_temperature"):
        uld_loss(torch.randn(3, 4), torch.randn(3, 4), teacher_temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="max")


# ---------------------------------------------------------------- span likelihood


def _random_spans(rows, num_spans, rng):
    """Per row: span ids for a student and a teacher sequence of different lengths (1-3 tokens per
    span on each side), with unlabelled tokens around them, some spans unused, and one span on the
    student side only (a truncated teacher)."""
    s_ids, t_ids = [], []
    for _ in range(rows):
        used = rng.randint(1, num_spans)
        s_row = [-1] * rng.randint(0, 2)
        t_row = [-1] * rng.randint(0, 2)
        for k in range(used):
            s_row += [k] * rng.randint(1, 3)
            t_row += [k] * rng.randint(1, 3)
        if used < num_spans:
            s_row += [used] * 2  # a span the teacher does not have
        s_ids.append([*s_row, -1])
        t_ids.append(t_row)
    pad = lambda rows_, n: [r + [-1] * (n - len(r)) for r in rows_]  # noqa: E731
    ls, lt = max(map(len, s_ids)), max(map(len, t_ids))
    return torch.tensor(pad(s_ids, ls)), torch.tensor(pad(t_ids, lt))


@pytest.mark.parametrize("kind", ["binary_kl", "binary_ce", "abs"])
@pytest.mark.parametrize("rows, num_spans, tau", [(1, 3, 100.0), (4, 5, 1.0)])
def test_span_loss_matches_naive_reference(kind, rows, num_spans, tau):
    rng = random.Random(_seed("span", kind, rows, num_spans, tau))
    s_span, t_span = _random_spans(rows, num_spans, rng)
    g = torch.Generator().manual_seed(_seed("span-values", kind, rows))
    s_logp = -torch.rand(s_span.shape, generator=g) * 2
    t_logp = -torch.rand(t_span.shape, generator=g) * 2
    values, valid = span_values(
        _rows(s_logp), _rows(t_logp), s_span.tolist(), t_span.tolist(), num_spans, kind, tau
    )
    assert any(valid) and not all(valid)
    kw = {"kind": kind, "binarization_temperature": tau}
    for reduction in ("mean", "sum", "none"):
        got = span_likelihood_loss(s_logp, t_logp, s_span, t_span, num_spans, reduction=reduction, **kw)
        assert got.dtype == torch.float32
        if reduction == "none":
            assert got.shape == (rows, num_spans)
        _check(got, values, valid, reduction)
    got = span_likelihood_loss(s_logp, t_logp, s_span, t_span, num_spans, num_valid=17, **kw)
    _check(got, values, valid, "mean", num_valid=17)


@pytest.mark.parametrize(
    "kind, tau", [("binary_kl", 100.0), ("binary_kl", 1.0), ("binary_ce", 3.0), ("abs", 1.0)]
)
def test_span_loss_gradcheck_float64_and_teacher_detached(kind, tau):
    s_span = torch.tensor([[0, 0, 1, 2, 2, -1], [-1, 0, 1, 1, 1, 2]])
    t_span = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 2]])
    g = torch.Generator().manual_seed(_seed("span-gradcheck", kind, tau))
    s_logp = (-torch.rand(2, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t_logp = (-torch.rand(2, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    kw = {"kind": kind, "binarization_temperature": tau}
    assert torch.autograd.gradcheck(
        lambda x: span_likelihood_loss(x, t_logp, s_span, t_span, 3, **kw), (s_logp,)
    )
    assert torch.autograd.gradcheck(
        lambda x: span_likelihood_loss(x, t_logp, s_span, t_span, 3, reduction="none", **kw), (s_logp,)
    )
    span_likelihood_loss(s_logp, t_logp, s_span, t_span, 3, **kw).backward()
    assert t_logp.grad is None
    assert s_logp.grad[0, 5] == 0 and s_logp.grad[1, 0] == 0  # tokens outside every span


def test_span_loss_zero_for_equal_likelihoods_and_ce_offset():
    # The same span likelihoods from different tokenizations: 2 + 1 student tokens vs 1 + 3 teacher ones.
    s_logp = torch.tensor([[-0.3, -0.9, -0.05]], dtype=torch.float64, requires_grad=True)
    t_logp = torch.tensor([[-1.2, -0.01, -0.02, -0.02]], dtype=torch.float64)
    s_span, t_span = torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1, 1]])
    for kind in ("binary_kl", "abs"):
        for tau in (1.0, 100.0):
            kw = {"kind": kind, "binarization_temperature": tau, "reduction": "none"}
            got = span_likelihood_loss(s_logp, t_logp, s_span, t_span, 2, **kw)
            assert torch.allclose(got, torch.zeros(1, 2, dtype=torch.float64), atol=1e-12)
    # binary_ce = binary_kl + the teacher's binary entropy: the same gradients.
    s2 = torch.tensor([[-0.6, -0.2, -1.0]], dtype=torch.float64, requires_grad=True)
    kl = span_likelihood_loss(s2, t_logp, s_span, t_span, 2, kind="binary_kl", reduction="none")
    ce = span_likelihood_loss(s2, t_logp, s_span, t_span, 2, kind="binary_ce", reduction="none")
    a = torch.tensor([-1.2, -0.05], dtype=torch.float64) / 100 - 1e-6
    entropy = -(a.exp() * a + (-a.expm1()) * torch.log(-a.expm1()))
    assert torch.allclose(ce - kl, entropy.unsqueeze(0), atol=1e-12)
    (g_kl,) = torch.autograd.grad(kl.sum(), s2)
    (g_ce,) = torch.autograd.grad(ce.sum(), s2)
    assert torch.allclose(g_kl, g_ce, atol=1e-12) and g_kl.abs().max() > 0


def test_span_loss_is_stable_near_probability_one():
    # Span log-likelihoods 0 (probability 1) and tiny: finite values and gradients, float32 and float64.
    for dtype in (torch.float32, torch.float64):
        s_logp = torch.tensor([[0.0, -1e-9, -1e-3, -30.0]], dtype=dtype, requires_grad=True)
        t_logp = torch.tensor([[0.0, -1e-7, -0.5, -1e-9]], dtype=dtype)
        ids = torch.tensor([[0, 1, 2, 3]])
        for kind in ("binary_kl", "binary_ce"):
            for tau in (1.0, 100.0):
                loss = span_likelihood_loss(
                    s_logp, t_logp, ids, ids, 4, kind=kind, binarization_temperature=tau
                )
                (grad,) = torch.autograd.grad(loss, s_logp)
                assert torch.isfinite(loss) and torch.isfinite(grad).all()
        got = span_likelihood_loss(s_logp, t_logp, ids, ids, 4, reduction="none")
        assert got[0, 0] == 0 and got[0, 3] > 0


def test_span_loss_from_aligned_spans_end_to_end():
    # "hello world": a byte-level student (one token per character) and a BPE-like teacher.
    student = [(i, i + 1) for i in range(11)]
    teacher = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 11), (0, 0)]  # [BOS] hel lo " wor" ld [EOS]
    spans = aligned_spans(student, teacher)
    s_ids, t_ids = span_index(spans, len(student), len(teacher))
    g = torch.Generator().manual_seed(_seed("end-to-end"))
    t_logp = -torch.rand(1, len(teacher), generator=g, dtype=torch.float64)
    # A student whose characters' log-probabilities add up to the teacher's tokens' exactly.
    s_logp = torch.zeros(1, len(student), dtype=torch.float64)
    for s0, s1, t0, t1 in spans:
        s_logp[0, s0:s1] = t_logp[0, t0:t1].sum() / (s1 - s0)
    s_span, t_span = torch.tensor([s_ids]), torch.tensor([t_ids])
    assert span_likelihood_loss(s_logp, t_logp, s_span, t_span, len(spans)).item() < 1e-12
    s_logp[0, 0] -= 0.5
    loss = span_likelihood_loss(s_logp, t_logp, s_span, t_span, len(spans), reduction="none")
    assert loss[0, 0] > 0 and torch.all(loss[0, 1:] < 1e-12)


def test_span_loss_no_valid_span_and_errors():
    s_logp = (-torch.rand(2, 3)).requires_grad_()
    none = torch.full((2, 3), -1)
    loss = span_likelihood_loss(s_logp, -torch.rand(2, 4), none, torch.full((2, 4), -1), 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s_logp.grad, torch.zeros(2, 3))
    assert span_likelihood_loss(s_logp, -torch.rand(2, 4), none, torch.full((2, 4), -1), 0).item() == 0.0
    ids_s, ids_t = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    t_logp = -torch.rand(2, 4)
    with pytest.raises(ValueError, match="outside"):
        span_likelihood_loss(s_logp, t_logp, ids_s + 2, ids_t, 2)
    with pytest.raises(ValueError, match="teacher_span has shape"):
        span_likelihood_loss(s_logp, t_logp, ids_s, ids_s, 2)
    with pytest.raises(ValueError, match="integer span ids"):
        span_likelihood_loss(s_logp, t_logp, ids_s.float(), ids_t, 2)
    with pytest.raises(ValueError, match="leading"):
        span_likelihood_loss(s_logp, t_logp[:1], ids_s, ids_t[:1], 2)
    with pytest.raises(ValueError, match="kind"):
        span_likelihood_loss(s_logp, t_logp, ids_s, ids_t, 2, kind="kl")
    with pytest.raises(ValueError, match="num_spans"):
        span_likelihood_loss(s_logp, t_logp, ids_s, ids_t, 2.0)
