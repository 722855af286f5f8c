"""importance_weighted_reverse_kl: the sampled-token reverse KL under an importance weight.

Checked against a naive float64 loop written here over shapes, estimators, caps and masks; by
enumerating every token (the exact expectation under the behaviour policy equals the reverse KL, and
so does the expectation of its gradient); against the plain sampled estimate when the behaviour policy
is the student; by gradcheck; by the clipped gradient's closed form; then the errors.
"""

import math
import zlib

import pytest
import torch

from distillery.functional import importance_weighted_reverse_kl, reverse_kl
from tests.unit.functional import reference as ref


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def naive_row(s, t, y, behaviour_logp, estimator, clip):
    """min(rho, c) * k(ell) at the sampled token, ell = log pi_s(y) - log pi_t(y), rho = pi_s(y) / pi_b(y)."""
    log_s, log_t = math.log(ref.softmax(s)[y]), math.log(ref.softmax(t)[y])
    ell = log_s - log_t
    rho = math.exp(log_s - behaviour_logp)
    w = rho if clip is None else min(rho, clip)
    return w * (ell if estimator == "k1" else math.exp(-ell) - 1 + ell)


def _inputs(shape, g, dtype=torch.float32):
    s = torch.randn(shape, generator=g, dtype=dtype) * 1.5
    t = torch.randn(shape, generator=g, dtype=dtype) * 1.5
    b = s + torch.randn(shape, generator=g, dtype=dtype)  # an older student
    tokens = torch.multinomial(b.reshape(-1, shape[-1]).softmax(-1).float(), 1, generator=g).reshape(
        shape[:-1]
    )
    old = b.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return s, t, tokens, old


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 7)])
@pytest.mark.parametrize("estimator", ["k3", "k1"])
@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_reference(shape, estimator, clip, masked):
    g = torch.Generator().manual_seed(_seed(shape, estimator, clip, masked))
    s, t, tokens, old = _inputs(shape, g)
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=g) > 0.4
        mask.view(-1)[0] = True
    valid = [True] * tokens.numel() if mask is None else mask.reshape(-1).tolist()
    rows = zip(
        s.reshape(-1, shape[-1]).double().tolist(),
        t.reshape(-1, shape[-1]).double().tolist(),
        tokens.reshape(-1).tolist(),
        old.reshape(-1).double().tolist(),
    )
    values = [naive_row(a, b, y, o, estimator, clip) for a, b, y, o in rows]
    kw = {"estimator": estimator, "clip": clip, "mask": mask}
    for reduction in ("mean", "sum", "none"):
        got = importance_weighted_reverse_kl(s, t, tokens, old, reduction=reduction, **kw)
        want = ref.reduce(values, valid, reduction)
        assert got.dtype == torch.float32
        if reduction == "none":
            assert got.shape == shape[:-1]
            assert torch.allclose(
                got.double().reshape(-1), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-4
            )
        else:
            assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-6), (got, want)
    got = importance_weighted_reverse_kl(s, t, tokens, old, num_valid=9, **kw)
    assert math.isclose(
        got.item(), ref.reduce(values, valid, "mean", num_valid=9), rel_tol=1e-4, abs_tol=1e-6
    )


@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_exact_expectation_is_reverse_kl_and_its_gradient(estimator):
    # Every token of the vocabulary, weighted by the behaviour policy's probability: the exact
    # expectation of the estimate, and of its gradient, under y ~ pi_b.
    g = torch.Generator().manual_seed(_seed("expectation", estimator))
    V = 6
    s0 = torch.randn(3, V, generator=g, dtype=torch.float64)
    t = torch.randn(3, V, generator=g, dtype=torch.float64)
    b = s0 + torch.randn(3, V, generator=g, dtype=torch.float64)
    log_b = b.log_softmax(-1)
    s = s0.clone().requires_grad_()
    tokens = torch.arange(V).expand(3, V)
    rows = importance_weighted_reverse_kl(
        s.unsqueeze(1).expand(3, V, V), t.unsqueeze(1).expand(3, V, V), tokens, log_b,
        estimator=estimator, clip=None, reduction="none",
    )  # fmt: skip
    expected = (log_b.exp() * rows).sum(-1)  # (3,)
    s_ref = s0.clone().requires_grad_()
    exact = reverse_kl(s_ref, t, reduction="none")
    assert torch.allclose(expected, exact, atol=1e-12)
    expected.sum().backward()
    exact.sum().backward()
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-12)


def test_behaviour_equal_to_student_gives_the_plain_estimate_with_the_score_term():
    g = torch.Generator().manual_seed(_seed("on-policy"))
    s0, t, tokens, _ = _inputs((5, 6), g, torch.float64)
    log_s = s0.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_t = t.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ell = log_s - log_t
    plain = {"k1": ell, "k3": torch.expm1(-ell) + ell}
    for estimator in ("k3", "k1"):
        s = s0.clone().requires_grad_()
        got = importance_weighted_reverse_kl(s, t, tokens, log_s, estimator=estimator, reduction="none")
        assert torch.allclose(got, plain[estimator], atol=1e-12)
        got.sum().backward()
        # The gradient: ell * grad log pi (k3), (ell + 1) * grad log pi (k1): the score-function form.
        s2 = s0.clone().requires_grad_()
        logp = s2.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        coef = ell if estimator == "k3" else ell + 1
        (coef.detach() * logp).sum().backward()
        assert torch.allclose(s.grad, s2.grad, atol=1e-12)


def test_gradcheck_float64_and_clipped_gradient():
    g = torch.Generator().manual_seed(_seed("gradcheck"))
    s, t, tokens, old = _inputs((5, 6), g, torch.float64)
    s.requires_grad_()
    t.requires_grad_()
    mask = torch.tensor([True, True, False, True, True])
    for estimator in ("k3", "k1"):
        # Unclipped (no cap, or a cap no ratio reaches), the gradient is the derivative of the value.
        for clip in (None, 1e6):
            kw = {"estimator": estimator, "clip": clip}
            assert torch.autograd.gradcheck(
                lambda x, kw=kw: importance_weighted_reverse_kl(x, t, tokens, old, **kw), (s,)
            )
            assert torch.autograd.gradcheck(
                lambda x, kw=kw: importance_weighted_reverse_kl(
                    x, t, tokens, old, mask=mask, reduction="none", **kw
                ),
                (s,),
            )
    importance_weighted_reverse_kl(s, t, tokens, old).backward()
    assert t.grad is None
    # Clipped: the weight's value is capped, its gradient stays the score-function direction.
    s1 = s.detach().clone().requires_grad_()
    logp = s1.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ratios = torch.tensor([0.5, 1.2, 3.0, 5.0, 0.8], dtype=torch.float64)
    old = logp.detach() - ratios.log()  # behaviour log-probabilities with these importance ratios
    clip = 2.0
    w = ratios.clamp_max(clip)
    ell = (logp - t.detach().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)).detach()
    for estimator, coef in (("k3", ell), ("k1", ell + 1)):
        s2 = s.detach().clone().requires_grad_()
        got = importance_weighted_reverse_kl(
            s2, t, tokens, old, estimator=estimator, clip=clip, reduction="sum"
        )
        got.backward()
        (want,) = torch.autograd.grad((w * coef * logp).sum(), s1, retain_graph=True)
        assert torch.allclose(s2.grad, want, atol=1e-12)
        value = ell if estimator == "k1" else torch.expm1(-ell) + ell
        assert torch.allclose(got, (w * value).sum(), atol=1e-12)


def test_teacher_zero_mass_no_valid_row_and_errors():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([[0.0, -math.inf, 0.0, 0.0]]).expand(3, 4)
    tokens, old = torch.tensor([1, 0, 2]), torch.full((3,), -1.0)
    loss = importance_weighted_reverse_kl(s, t, tokens, old, reduction="none")
    assert torch.isfinite(loss).all() and loss[0] > 1e20  # floored, not inf
    empty = importance_weighted_reverse_kl(s, t, tokens, old, mask=torch.zeros(3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(s.grad, torch.zeros(3, 4))
    t = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        importance_weighted_reverse_kl(s, torch.randn(3, 5), tokens, old)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        importance_weighted_reverse_kl(s, t, tokens, old[:2])
    with pytest.raises(ValueError, match="tokens holds id 4"):
        importance_weighted_reverse_kl(s, t, torch.tensor([0, 4, 1]), old)
    with pytest.raises(ValueError, match="tokens has shape"):
        importance_weighted_reverse_kl(s, t, tokens[:2], old)
    with pytest.raises(ValueError, match="integer token ids"):
        importance_weighted_reverse_kl(s, t, tokens.float(), old)
    # Masked rows may hold anything (padding ids such as -100).
    padded = torch.tensor([0, -100, 1])
    importance_weighted_reverse_kl(s, t, padded, old, mask=padded >= 0)
    with pytest.raises(ValueError, match="clip"):
        importance_weighted_reverse_kl(s, t, tokens, old, clip=0.5)
    with pytest.raises(ValueError, match="estimator"):
        importance_weighted_reverse_kl(s, t, tokens, old, estimator="k2")
