import math
import zlib

import pytest
import torch

from distillery.functional import forward_kl
from tests.unit.functional import reference as ref

SHAPES = [(1, 2), (5, 3), (2, 3, 7), (2, 2, 2, 11)]


def _rows(x):
    return x.reshape(-1, x.shape[-1]).double().tolist()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_naive_reference(shape, temperature, masked, reduction):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, temperature, masked, reduction)).encode()))
    s = torch.randn(shape, generator=g) * 3
    t = torch.randn(shape, generator=g) * 3
    mask = torch.rand(shape[:-1], generator=g) > 0.4 if masked else None
    got = forward_kl(s, t, temperature, mask=mask, reduction=reduction)
    valid = [True] * s[..., 0].numel() if mask is None else mask.reshape(-1).tolist()
    values = [ref.forward_kl_row(a, b, temperature) for a, b in zip(_rows(s), _rows(t))]
    want = ref.reduce(values, valid, reduction)
    if reduction == "none":
        assert got.shape == shape[:-1]
        assert torch.allclose(
            got.double().reshape(-1), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-4
        )
    else:
        assert got.shape == ()
        assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-5)


def test_num_valid_normaliser_divides_the_sum():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    total = forward_kl(s, t, reduction="sum")
    assert torch.allclose(forward_kl(s, t, num_valid=10), total / 10)
    assert torch.allclose(forward_kl(s, t, num_valid=torch.tensor(10.0)), total / 10)


def test_all_masked_batch_gives_zero_and_zero_gradient():
    s = torch.randn(3, 5, requires_grad=True)
    out = forward_kl(s, torch.randn(3, 5), mask=torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gradcheck_float64():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda x: forward_kl(x, t, 2.0, mask=mask), (s,))
    tt = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: forward_kl(x, y, 3.0), (s, tt))


def test_low_precision_inputs_are_computed_in_float32():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    out = forward_kl(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, forward_kl(s.bfloat16().float(), t.bfloat16().float()))


def test_large_logits_and_padded_inf_slots_stay_finite():
    s = (torch.randn(4, 8) * 1e4).requires_grad_()
    t = torch.randn(4, 8) * 1e4
    out = forward_kl(s, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    # -inf in the same (padded) slots on both sides: those slots contribute nothing
    s2 = torch.randn(3, 6)
    t2 = torch.randn(3, 6)
    s_pad = torch.cat([s2, torch.full((3, 2), -math.inf)], -1).requires_grad_()
    t_pad = torch.cat([t2, torch.full((3, 2), -math.inf)], -1)
    out = forward_kl(s_pad, t_pad, 2.0)
    out.backward()
    assert torch.allclose(out, forward_kl(s2, t2, 2.0))
    assert torch.isfinite(s_pad.grad).all()
    # -inf on one side only: still finite values and gradients
    for a, b in (
        (s_pad.detach(), torch.cat([t2, torch.randn(3, 2)], -1)),
        (torch.cat([s2, torch.randn(3, 2)], -1), t_pad),
    ):
        a = a.clone().requires_grad_()
        out = forward_kl(a, b)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(a.grad).all()


def test_vocab_size_slices_a_padded_vocabulary():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="pass vocab_size=10"):
        forward_kl(s, t)
    assert torch.allclose(forward_kl(s, t, vocab_size=10), forward_kl(s, t[..., :10]))
    with pytest.raises(ValueError, match="larger than the student"):
        forward_kl(s, t, vocab_size=11)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="leading"):
        forward_kl(torch.randn(2, 3, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        forward_kl(torch.randn(2, 4), torch.randn(2, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(torch.randn(2, 4), torch.randn(2, 4), reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(torch.randn(2, 4), torch.randn(2, 4), temperature=0.0)


def test_t_squared_keeps_gradient_scale():
    """Hinton's argument: with the T^2 factor the gradient norm stays of the same order as T grows."""
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g) * 2
    norms = []
    for T in (1.0, 4.0, 16.0, 64.0):
        s = s0.clone().requires_grad_()
        forward_kl(s, t, T).backward()
        norms.append(s.grad.norm().item())
    # Without T^2 the norm would fall by ~T^2 (4,096x from T=1 to T=64); with it, within a small factor.
    assert max(norms) / min(norms) < 4.0, norms
