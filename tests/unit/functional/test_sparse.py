"""Sparse (cached) teachers: top-k + tail divergences, sampled forward KL, the compression helpers.

Checked against the naive float64 loops in ``reference.py`` over shapes, k, masks, reductions and
temperatures; against the dense divergences at k = V; by gradcheck; statistically for the
unbiasedness of the sampled estimate (and the bias of top-k); then the chunked computation from
hidden states, the refusals and the error messages.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.functional import (
    check_sparse_divergence,
    chunked_sparse_kd_from_hidden,
    dequantize_logprobs,
    forward_kl,
    generalized_jsd,
    quantize_logprobs,
    reverse_kl,
    sample_tokens,
    sampled_forward_kl,
    sparse_divergence_support,
    tail_from_topk_logp,
    topk_tail,
    topk_tail_divergence,
)
from tests.unit.functional import reference as ref

# name -> (divergence, beta)
TOPK_CASES = {
    "forward_kl": ("forward_kl", 0.5),
    "reverse_kl": ("reverse_kl", 0.5),
    "jsd_0": ("jsd", 0.0),
    "jsd_0.3": ("jsd", 0.3),
    "jsd_0.5": ("jsd", 0.5),
    "jsd_1": ("jsd", 1.0),
}

SHAPES = [(5, 7), (2, 3, 6)]


_seed, _rows, _mask = ref.case_seed, ref.flat_rows, ref.random_mask


def _teacher_topk(t, k, T, g, perturb=True):
    """Any k distinct ids per row (not only the top ones), the teacher's log-probabilities at them and
    the tail mass; with ``perturb``, stored values that no longer sum to 1 exactly (storage rounding)."""
    lead, V = t.shape[:-1], t.shape[-1]
    ids = torch.rand(*lead, V, generator=g).argsort(-1)[..., :k]
    logp = torch.log_softmax(t.double() / T, -1).gather(-1, ids)
    tail = (1 - logp.exp().sum(-1)).clamp_min(0) if k < V else torch.zeros(lead, dtype=torch.float64)
    if perturb:
        logp = logp + 0.02 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
        tail = tail * 1.1
    return ids, logp.to(t.dtype), tail.to(t.dtype)


def _check_against(got, values, valid, reduction, dtype=torch.float32):
    want = ref.reduce(values, valid, reduction)
    assert got.dtype == dtype
    if reduction == "none":
        want = torch.tensor(want, dtype=torch.float64)
        assert torch.allclose(got.double().reshape(-1), want, atol=1e-5, rtol=1e-4), (got, want)
    else:
        assert got.shape == ()
        assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-5), (got, want)


@pytest.mark.parametrize("case", sorted(TOPK_CASES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, "V"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_topk_tail_divergence_matches_naive_reference(case, shape, k, temperature, masked):
    divergence, beta = TOPK_CASES[case]
    g = torch.Generator().manual_seed(_seed(case, shape, k, temperature, masked))
    k = shape[-1] if k == "V" else k
    s, t = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    ids, logp, tail = _teacher_topk(t, k, temperature, g)
    mask = _mask(shape[:-1], g) if masked else None
    valid = [True] * s[..., 0].numel() if mask is None else mask.reshape(-1).tolist()
    values = [
        ref.topk_tail_row(a, i, lp, r, temperature, divergence, beta)
        for a, i, lp, r in zip(_rows(s), ids.reshape(-1, k).tolist(), _rows(logp), tail.reshape(-1).tolist())
    ]
    for reduction in ("mean", "sum", "none"):
        got = topk_tail_divergence(
            s, ids, logp, tail, divergence=divergence, beta=beta, temperature=temperature, mask=mask,
            reduction=reduction,
        )  # fmt: skip
        _check_against(got, values, valid, reduction)
    got = topk_tail_divergence(
        s, ids, logp, tail, divergence=divergence, beta=beta, temperature=temperature, mask=mask, num_valid=13
    )
    assert math.isclose(
        got.item(), ref.reduce(values, valid, "mean", num_valid=13), rel_tol=1e-4, abs_tol=1e-6
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, "V"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_sampled_forward_kl_matches_naive_reference(shape, k, temperature, masked):
    g = torch.Generator().manual_seed(_seed("sampled", shape, k, temperature, masked))
    k = shape[-1] if k == "V" else k
    s, t = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    ids, weights, logp = sample_tokens(t, k, draws=k + 2, temperature=temperature, generator=g)
    weights = weights * 0.9  # the caller's weights, not summing to 1
    mask = _mask(shape[:-1], g) if masked else None
    valid = [True] * s[..., 0].numel() if mask is None else mask.reshape(-1).tolist()
    values = [
        ref.sampled_forward_kl_row(a, i, w, lp, temperature)
        for a, i, w, lp in zip(_rows(s), ids.reshape(-1, k).tolist(), _rows(weights), _rows(logp))
    ]
    for reduction in ("mean", "sum", "none"):
        got = sampled_forward_kl(
            s, ids, weights, logp, temperature=temperature, mask=mask, reduction=reduction
        )
        _check_against(got, values, valid, reduction)


@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "jsd_0", "jsd_0.3", "jsd_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_with_k_equal_to_v_is_the_dense_divergence(case, dtype):
    divergence, beta = TOPK_CASES[case]
    g = torch.Generator().manual_seed(_seed("dense", case))
    T = 2.0
    s0, t = torch.randn(3, 4, 9, generator=g).to(dtype) * 2, torch.randn(3, 4, 9, generator=g).to(dtype) * 2
    ids = torch.rand(3, 4, 9, generator=g).argsort(-1)  # every id, in a random order
    logp = torch.log_softmax(t / T, -1).gather(-1, ids)
    tail = torch.zeros(3, 4, dtype=dtype)
    mask = _mask((3, 4), g)
    s1, s2 = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    got = topk_tail_divergence(
        s1, ids, logp, tail, divergence=divergence, beta=beta, temperature=T, mask=mask, reduction="none"
    )
    dense = {
        "forward_kl": lambda: forward_kl(s2, t, T, mask=mask, reduction="none"),
        "reverse_kl": lambda: reverse_kl(s2, t, T, mask=mask, reduction="none"),
        "jsd": lambda: generalized_jsd(s2, t, beta, T, mask=mask, reduction="none"),
    }[divergence]()
    got.sum().backward()
    dense.sum().backward()
    assert torch.isfinite(s1.grad).all()
    if dtype == torch.float64:
        assert torch.allclose(got, dense, rtol=0, atol=1e-12)
        assert torch.allclose(s1.grad, s2.grad, rtol=0, atol=1e-12)
    else:
        assert torch.allclose(got, dense) and torch.allclose(s1.grad, s2.grad, atol=1e-7)
    assert dense.abs().max() > 0.05  # not vacuous
    # With k = V the tail bucket is empty on both sides: a stored tail (rounding) is ignored.
    kw = {"divergence": divergence, "beta": beta, "temperature": T, "mask": mask, "reduction": "none"}
    assert torch.equal(topk_tail_divergence(s0, ids, logp, tail + 0.01, **kw), got.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_with_exact_teacher_weights_is_the_dense_forward_kl(dtype):
    g = torch.Generator().manual_seed(_seed("dense-sampled"))
    T = 1.5
    s0, t = torch.randn(2, 5, 8, generator=g).to(dtype) * 2, torch.randn(2, 5, 8, generator=g).to(dtype) * 2
    ids = torch.rand(2, 5, 8, generator=g).argsort(-1)
    logp = torch.log_softmax(t / T, -1).gather(-1, ids)
    s1, s2 = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    got = sampled_forward_kl(s1, ids, logp.exp(), logp, temperature=T, reduction="none")
    dense = forward_kl(s2, t, T, reduction="none")
    got.sum().backward()
    dense.sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(got, dense, rtol=0, atol=tol) and torch.allclose(s1.grad, s2.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "jsd_0.3", "jsd_0", "jsd_1"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_gradcheck_topk_float64(case, k):
    divergence, beta = TOPK_CASES[case]
    g = torch.Generator().manual_seed(_seed("gradcheck", case, k))
    s = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    ids, logp, tail = _teacher_topk(torch.randn(4, 6, dtype=torch.float64, generator=g), k, 1.5, g)
    mask = torch.tensor([True, False, True, True])

    def loss(x, **kw):
        return topk_tail_divergence(
            x, ids, logp, tail, divergence=divergence, beta=beta, temperature=1.5, **kw
        )

    assert torch.autograd.gradcheck(lambda x: loss(x, mask=mask), (s,))
    assert torch.autograd.gradcheck(lambda x: loss(x, reduction="none"), (s,))


def test_gradcheck_sampled_float64():
    g = torch.Generator().manual_seed(_seed("gradcheck-sampled"))
    s = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    ids = torch.tensor([[0, 2, 5], [1, 3, 4], [5, 4, 0], [2, 1, 0]])
    weights = torch.tensor([[0.5, 0.25, 0.25], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]).double()
    logp = torch.randn(4, 3, dtype=torch.float64, generator=g) - 2
    logp[1, 2] = -math.inf  # an unused slot at a zero-probability id
    mask = torch.tensor([True, True, False, True])
    assert torch.autograd.gradcheck(
        lambda x: sampled_forward_kl(x, ids, weights, logp, temperature=2.0, mask=mask), (s,)
    )


def test_zero_tails_inf_logp_and_zero_weight_slots_contribute_exactly_nothing():
    g = torch.Generator().manual_seed(_seed("zeros"))
    s = torch.randn(3, 5, generator=g).requires_grad_()
    ids = torch.tensor([[0, 1], [2, 4], [3, 1]])
    logp = torch.tensor([[-0.5, -1.0], [-0.2, -math.inf], [-0.1, -3.0]])
    tail = torch.tensor([0.0, 0.0, 0.05])
    for name in ("forward_kl", "reverse_kl", "jsd"):
        out = topk_tail_divergence(s, ids, logp, tail, divergence=name, reduction="none")
        (grad,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        # Reverse KL is infinite where the teacher has no mass and the student has some (rows 0 and 1):
        # floored at LOG_FLOOR like the dense functions, finite but huge.
        rows = [2] if name == "reverse_kl" else [0, 1, 2]
        want = [
            ref.topk_tail_row(_rows(s)[r], ids[r].tolist(), logp[r].tolist(), tail[r].item(), 1.0, name)
            for r in rows
        ]
        assert torch.allclose(out[rows].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # A teacher with no mass on padded (-inf) ids, k = V, zero tail: finite everywhere.
    t = torch.cat([torch.randn(3, 3, generator=g), torch.full((3, 2), -math.inf)], -1)
    ids, logp, tail = topk_tail(t, 5)
    assert torch.equal(tail, torch.zeros(3)) and torch.isinf(logp[:, 3:]).all()
    out = topk_tail_divergence(s, ids, logp, tail, divergence="reverse_kl")
    (grad,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    # Sampled: zero-weight slots, also at -inf log-probabilities, change nothing.
    ids, w, lp = (
        torch.tensor([[0, 3, 1]]),
        torch.tensor([[0.75, 0.25, 0.0]]),
        torch.tensor([[-0.3, -1.5, -math.inf]]),
    )
    x = s[:1].detach().requires_grad_()
    out = sampled_forward_kl(x, ids, w, lp)
    (grad,) = torch.autograd.grad(out, x)
    assert torch.isfinite(grad).all()
    assert torch.equal(out, sampled_forward_kl(x, ids[:, :2], w[:, :2], lp[:, :2]))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_rows_whose_student_tail_is_tiny_keep_their_precision(divergence):
    """The student's tail mass comes from 1 - sum of its kept probabilities, except on rows where that
    subtraction loses its digits (a confident student): those take the exact log-sum over the other ids.
    float32 on such rows agrees with float64 in value and gradient."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 50, generator=g)
    ids = torch.stack([torch.randperm(50, generator=g)[:3] for _ in range(6)])
    s[:3] = s[:3].scatter(-1, ids[:3], 25.0)  # rows 0-2: the kept ids hold all but ~1e-9 of the mass
    teacher = torch.randn(6, 50, generator=g)
    _, t_logp, t_tail = topk_tail(teacher, 3)  # the values of some top-3 (the ids below are the student's)
    results = []
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype).detach().requires_grad_()
        value = topk_tail_divergence(x, ids, t_logp.to(dtype), t_tail.to(dtype), divergence=divergence,
                                     reduction="none")  # fmt: skip
        value.sum().backward()
        results.append((value.detach().double(), x.grad.double()))
    (v32, g32), (v64, g64) = results
    assert torch.allclose(v32, v64, rtol=1e-4, atol=1e-6) and torch.allclose(g32, g64, rtol=1e-3, atol=1e-6)
    tail = 1 - torch.softmax(s.double(), -1).gather(-1, ids).sum(-1)
    assert (tail[:3] < 1e-8).all() and (tail[3:] > 1e-2).all()  # both paths were taken


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_coarsened_divergence_is_a_lower_bound_of_the_full_one(name):
    g = torch.Generator().manual_seed(_seed("bound", name))
    s, t = torch.randn(64, 10, generator=g) * 2, torch.randn(64, 10, generator=g) * 2
    dense = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}[name]
    full = dense(s, t, temperature=2.0, reduction="none")
    previous = torch.zeros(64)
    for k in (1, 3, 6, 8):  # (k = V - 1 is lossless too: a one-id tail)
        ids, logp, tail = topk_tail(t, k, temperature=2.0)
        coarse = topk_tail_divergence(s, ids, logp, tail, divergence=name, temperature=2.0, reduction="none")
        assert (coarse <= full + 1e-5).all()
        assert (coarse >= previous - 1e-5).all()  # refining the buckets (top-k nested in top-k') only adds
        previous = coarse
    assert (full - previous).max() > 1e-3  # strict below k = V


def test_sampled_gradient_is_unbiased_and_topk_gradient_is_not():
    """Mean over 4000 independent sample_tokens draws (k = 4 of V = 12) of the sampled forward KL's
    gradient == the dense forward KL gradient within 5 standard errors per entry (plus 1e-6); the
    top-k (k = 4) gradient of the same pair misses it by far more than that tolerance."""
    g = torch.Generator().manual_seed(1234)
    rows, V, k, n, T = 3, 12, 4, 4000, 2.0
    s, t = torch.randn(rows, V, generator=g) * 1.5, torch.randn(rows, V, generator=g) * 3
    ids, weights, logp = sample_tokens(t.expand(n, rows, V), k, temperature=T, generator=g)  # n draws
    assert torch.equal(weights.sum(-1), torch.ones(n, rows))
    x = s.expand(n, rows, V).clone().requires_grad_()
    values = sampled_forward_kl(x, ids, weights, logp, temperature=T, reduction="none")  # (n, rows)
    (per_draw,) = torch.autograd.grad(values.sum(), x)  # (n, rows, V): each draw's gradient of its row
    x = s.clone().requires_grad_()
    dense_value = forward_kl(x, t, T, reduction="none")
    (dense,) = torch.autograd.grad(dense_value.sum(), x)
    tolerance = 5 * per_draw.std(0) / math.sqrt(n) + 1e-6
    assert ((per_draw.mean(0) - dense).abs() <= tolerance).all(), (per_draw.mean(0) - dense).abs() / tolerance
    value_tolerance = 5 * values.detach().std(0) / math.sqrt(n) + 1e-6
    assert ((values.detach().mean(0) - dense_value.detach()).abs() <= value_tolerance).all()
    x = s.clone().requires_grad_()
    top = topk_tail_divergence(x, *topk_tail(t, k, temperature=T), temperature=T, reduction="sum")
    (biased,) = torch.autograd.grad(top, x)
    assert ((biased - dense).abs() / tolerance).max() > 10


def test_topk_tail_compresses_a_teacher():
    g = torch.Generator().manual_seed(_seed("topk_tail"))
    t = torch.randn(2, 3, 10, generator=g) * 3
    for T in (1.0, 2.0):
        ids, logp, tail = topk_tail(t, 4, temperature=T)
        assert ids.shape == logp.shape == (2, 3, 4) and tail.shape == (2, 3)
        assert ids.dtype == torch.int64 and logp.dtype == tail.dtype == torch.float32
        full = torch.log_softmax(t.double() / T, -1)
        assert torch.equal(ids, full.topk(4, dim=-1).indices)
        assert torch.allclose(logp.double(), full.gather(-1, ids), atol=1e-6)
        assert torch.allclose(tail.double(), 1 - full.gather(-1, ids).exp().sum(-1), atol=1e-6)
    ids, logp, tail = topk_tail(t, 10)
    assert torch.equal(tail, torch.zeros(2, 3))
    # The tail is exp(log-sum of the others - log-sum of all): accurate where 1 - sum(p) would round to 0.
    peaked = torch.tensor([[40.0, 0.0, 0.0, 1.0]])
    _, _, tail = topk_tail(peaked, 1)
    want = (1 + 1 + math.e) * math.exp(-40.0)
    assert tail.item() > 0 and math.isclose(tail.item(), want, rel_tol=1e-5)
    assert topk_tail(t.double(), 3)[1].dtype == torch.float64


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 4, 3)])
def test_the_tail_of_top_k_log_probabilities_matches_a_loop(shape):
    g = torch.Generator().manual_seed(_seed("tail_from_topk_logp", *shape))
    full = torch.log_softmax(torch.randn(*shape[:-1], 12, generator=g) * 2, -1)
    logp = full.topk(shape[-1], dim=-1).values
    got = tail_from_topk_logp(logp)
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    flat, want = logp.reshape(-1, shape[-1]).double(), []
    for row in flat:  # one row at a time, in float64
        mass = 0.0
        for value in row.tolist():
            mass += math.exp(value)
        want.append(max(1e-6, 1.0 - mass))
    assert torch.allclose(got.reshape(-1).double(), torch.tensor(want, dtype=torch.float64), atol=1e-7)
    # a teacher whose top-k hold everything: the floor, not zero (reverse KL stays finite)
    assert tail_from_topk_logp(torch.log_softmax(torch.randn(3), -1)).item() == pytest.approx(1e-6)


def test_sample_tokens_layout():
    g = torch.Generator().manual_seed(_seed("sample"))
    t = torch.cat([torch.randn(2, 5, 9, generator=g) * 2, torch.full((2, 5, 3), -math.inf)], -1)
    for k, draws in ((4, None), (3, 3), (5, 16)):
        ids, weights, logp = sample_tokens(t, k, draws=draws, temperature=1.5, generator=g)
        assert ids.shape == weights.shape == logp.shape == (2, 5, k)
        assert ids.dtype == torch.int64 and weights.dtype == logp.dtype == torch.float32
        assert (ids.diff(dim=-1) > 0).all()  # distinct, ascending
        assert torch.allclose(weights.sum(-1), torch.ones(2, 5))
        assert not weights[ids >= 9].any()  # zero-probability ids are never drawn
        assert torch.equal(logp, torch.log_softmax(t / 1.5, -1).gather(-1, ids))
        if draws is None or draws <= k:
            counts = weights * (draws or k)
            assert torch.equal(counts, counts.round())  # count / draws, exactly
    a = sample_tokens(t, 4, generator=torch.Generator().manual_seed(7))
    b = sample_tokens(t, 4, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    one_hot = torch.tensor([[0.0, 50.0, 0.0]])
    ids, weights, _ = sample_tokens(one_hot, 2, draws=5)
    assert weights[ids == 1].item() == 1.0


def test_quantized_logprobs_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(_seed("quantize"))
    logp = torch.log_softmax(torch.randn(4, 6, 50, generator=g) * 4, -1).topk(8, dim=-1).values
    logp[0, 0, -1] = -math.inf
    codes, scale = quantize_logprobs(logp)
    assert codes.dtype == torch.uint8 and codes.shape == (4, 6, 8) and scale.shape == (4, 6)
    back = dequantize_logprobs(codes, scale)
    assert back.dtype == torch.float32
    finite = torch.isfinite(logp)
    err = (back - logp).abs()[finite]
    bound = (scale.unsqueeze(-1) / 2 + 4 * torch.finfo(torch.float32).eps * logp.abs()).expand_as(logp)[
        finite
    ]
    assert (err <= bound).all()
    assert (err / bound).max() > 0.8  # the bound is nearly attained: it is the right one
    assert codes[0, 0, -1] == 255 and back[0, 0, -1] == -255 * scale[0, 0]  # -inf: the smallest probability
    assert torch.equal(codes.amax(-1), torch.full((4, 6), 255, dtype=torch.uint8))  # each row's minimum
    # One-entry rows of log-probability 0 (scale floored at tiny, no division by 0).
    codes, scale = quantize_logprobs(torch.zeros(3, 1))
    assert torch.equal(dequantize_logprobs(codes, scale), torch.zeros(3, 1))


@pytest.mark.parametrize(
    ("kind", "divergence", "beta"),
    [
        ("topk", "forward_kl", 0.5),
        ("topk", "reverse_kl", 0.5),
        ("topk", "jsd", 0.3),
        ("sampled", "forward_kl", 0.5),
    ],
)
@pytest.mark.parametrize(
    ("reduction", "num_valid"), [("mean", None), ("sum", None), ("mean", torch.tensor(17.0))]
)
def test_chunked_matches_unchunked_value_and_gradients(kind, divergence, beta, reduction, num_valid):
    g = torch.Generator().manual_seed(_seed("chunked", kind, divergence, reduction))
    lead, H, V, k, T = (3, 4), 5, 11, 3, 2.0
    h = torch.randn(*lead, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.8).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randn(*lead, V, generator=g) * 2
    mask = _mask(lead, g)
    kw = {"temperature": T, "mask": mask, "reduction": reduction, "num_valid": num_valid}
    if kind == "topk":
        ids, values, tail = topk_tail(t, k, temperature=T)
        extra = {"teacher_tail": tail}
        naive = topk_tail_divergence(
            F.linear(h, w, b), ids, values, tail, divergence=divergence, beta=beta, **kw
        )
    else:
        ids, weights, values = sample_tokens(t, k, temperature=T, generator=g)
        extra = {"teacher_weights": weights}
        naive = sampled_forward_kl(F.linear(h, w, b), ids, weights, values, **kw)
    want = torch.autograd.grad(naive, (h, w, b))
    for chunk_size in (1, 3, 64):
        got = chunked_sparse_kd_from_hidden(
            h, w, ids, values, kind=kind, divergence=divergence, beta=beta, student_head_bias=b,
            chunk_size=chunk_size, **extra, **kw,
        )  # fmt: skip
        assert got.shape == () and got.dtype == torch.float32
        assert torch.allclose(got, naive, rtol=1e-5, atol=1e-6), (chunk_size, got, naive)
        for x, y in zip(torch.autograd.grad(got, (h, w, b)), want):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (chunk_size, (x - y).abs().max())
    assert want[0][mask].abs().sum() > 0 and not want[0][~mask].any()


def test_chunked_without_valid_tokens_is_zero_with_zero_gradients():
    h, w = torch.randn(2, 3, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    ids, logp, tail = topk_tail(torch.randn(2, 3, 7), 2)
    out = chunked_sparse_kd_from_hidden(
        h, w, ids, logp, teacher_tail=tail, mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    gh, gw = torch.autograd.grad(out, (h, w))
    assert out.item() == 0.0 and not gh.any() and not gw.any()


def test_low_precision_teacher_and_student_compute_in_float32():
    g = torch.Generator().manual_seed(_seed("dtype"))
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    ids, logp, tail = topk_tail(t, 3)
    want = topk_tail_divergence(s.half().float(), ids, logp.half().float(), tail.half().float())
    got = topk_tail_divergence(s.half(), ids.int(), logp.half(), tail.half())
    assert got.dtype == torch.float32 and torch.allclose(got, want)
    assert topk_tail_divergence(s.double(), ids, logp, tail).dtype == torch.float64


def test_support_table_and_refusals():
    for kind, divergence in (
        ("topk", "forward_kl"),
        ("topk", "reverse_kl"),
        ("topk", "jsd"),
        ("sampled", "forward_kl"),
    ):
        assert sparse_divergence_support(kind, divergence) is None
        check_sparse_divergence(kind, divergence)
    for divergence in ("reverse_kl", "jsd"):
        message = sparse_divergence_support("sampled", divergence)
        for word in ("reverse_kl", "topk", "forward_kl", "unbounded variance", "dense cache"):
            assert word in message
        with pytest.raises(ValueError, match="reverse_kl") as info:
            check_sparse_divergence("sampled", divergence)
        assert "topk" in str(info.value)
    assert "choose one of topk, sampled" in sparse_divergence_support("dense", "forward_kl")
    assert "choose one of forward_kl, reverse_kl, jsd" in sparse_divergence_support("topk", "tvd")
    h, w = torch.randn(2, 4), torch.randn(6, 4)
    ids, weights, logp = sample_tokens(torch.randn(2, 6), 2)
    with pytest.raises(ValueError, match="reverse_kl.*topk"):
        chunked_sparse_kd_from_hidden(
            h, w, ids, logp, kind="sampled", teacher_weights=weights, divergence="jsd"
        )


def _topk_call(**change):
    g = torch.Generator().manual_seed(0)
    x = {
        "s": torch.randn(2, 3, 6, generator=g),
        **dict(zip(("ids", "logp", "tail"), topk_tail(torch.randn(2, 3, 6), 3))),
    }
    kw = {k: change.pop(k) for k in ("divergence", "temperature", "beta", "mask", "reduction") if k in change}
    x.update(change)
    return topk_tail_divergence(x["s"], x["ids"], x["logp"], x["tail"], **kw)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"ids": torch.tensor([[[0, 1, 0]] * 3] * 2)},
            r"teacher_ids repeats an id within a row \(valid row 0",
        ),
        ({"ids": torch.tensor([[[0, 1, 6]] * 3] * 2)}, r"teacher_ids holds id 6, outside \[0, 6\)"),
        ({"ids": torch.zeros(2, 3, 3)}, "teacher_ids must hold integer token ids"),
        (
            {"ids": torch.zeros(3, 2, 3, dtype=torch.long)},
            r"teacher_ids has shape \(3, 2, 3\); expected \[..., k\]",
        ),
        ({"ids": torch.zeros(2, 3, 0, dtype=torch.long)}, r"k=0 slots per row; need 1 <= k <= V=6"),
        ({"ids": torch.arange(7).expand(2, 3, 7)}, r"k=7 slots per row; need 1 <= k <= V=6"),
        (
            {"logp": torch.zeros(2, 3, 2)},
            r"teacher_logp has shape \(2, 3, 2\); expected \(2, 3, 3\) \(one value per slot",
        ),
        (
            {"tail": torch.zeros(2, 3, 1)},
            r"teacher_tail has shape \(2, 3, 1\); expected \(2, 3\) \(one value per row",
        ),
        ({"tail": torch.zeros(2, 3, dtype=torch.long)}, "teacher_tail must be a floating-point tensor"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, "mask has shape"),
        ({"divergence": "tvd"}, "unknown divergence 'tvd'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"beta": 1.5}, r"beta must lie in \[0, 1\]"),
        ({"reduction": "avg"}, "reduction must be one of"),
    ],
)
def test_topk_errors(change, message):
    with pytest.raises(ValueError, match=message):
        _topk_call(**change)


def test_invalid_masked_rows_are_not_checked():
    ids = torch.tensor([[[0, 1, 2], [0, 0, 0], [3, 4, 5]]] * 2)  # padding rows hold zeros
    mask = torch.tensor([[True, False, True]] * 2)
    assert torch.isfinite(_topk_call(ids=ids, mask=mask))


def test_sampled_and_chunked_errors():
    s, ids = torch.randn(2, 6), torch.tensor([[0, 1], [2, 2]])
    w, lp = torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.zeros(2, 2)
    assert torch.isfinite(sampled_forward_kl(s, ids, w, lp))  # repeated ids are fine for samples
    with pytest.raises(ValueError, match="teacher_weights must be >= 0"):
        sampled_forward_kl(s, ids, -w, lp)
    with pytest.raises(ValueError, match=r"teacher_weights has shape \(2, 1\); expected \(2, 2\)"):
        sampled_forward_kl(s, ids, w[:, :1], lp)
    h, head = torch.randn(2, 4), torch.randn(6, 4)
    tail = torch.zeros(2)
    for kw, message in (
        ({"kind": "topk"}, "kind='topk' needs teacher_tail"),
        ({"kind": "sampled"}, "kind='sampled' needs teacher_weights"),
        ({"teacher_tail": tail, "teacher_weights": w}, "teacher_weights is not used with kind='topk'"),
        ({"kind": "dense", "teacher_tail": tail}, "unknown sparse teacher kind 'dense'"),
        ({"teacher_tail": tail, "reduction": "none"}, 'not "none"'),
        ({"teacher_tail": tail, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"teacher_tail": tail, "mask": torch.ones(3, dtype=torch.bool)}, "mask has shape"),
    ):
        with pytest.raises(ValueError, match=message):
            chunked_sparse_kd_from_hidden(h, head, torch.tensor([[0, 1], [2, 3]]), lp, **kw)
    with pytest.raises(ValueError, match=r"teacher_values has shape \(2, 3\)"):
        chunked_sparse_kd_from_hidden(h, head, ids, torch.zeros(2, 3), kind="sampled", teacher_weights=w)
    with pytest.raises(ValueError, match="student_hidden has shape"):
        chunked_sparse_kd_from_hidden(h, torch.randn(6, 5), ids, lp, kind="sampled", teacher_weights=w)


def test_compression_helper_errors():
    t = torch.randn(3, 5)
    for fn in (topk_tail, sample_tokens):
        for k in (0, 6, 2.0):
            with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= V=5"):
                fn(t, k)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fn(t, 2, temperature=-1.0)
        with pytest.raises(ValueError, match="floating-point"):
            fn(torch.zeros(3, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        sample_tokens(t, 2, draws=0)
    with pytest.raises(ValueError, match="codes must be uint8"):
        dequantize_logprobs(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"scale has shape \(3,\); expected the codes' leading shape \(2,\)"):
        dequantize_logprobs(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(3))
    with pytest.raises(ValueError, match="k >= 1"):
        quantize_logprobs(torch.zeros(2, 0))
