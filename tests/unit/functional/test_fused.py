"""The closed-form-gradient path of the row divergences (``functional/_fused.py``).

Values against the naive float64 loops of ``reference.py``; gradients against central finite
differences of those loops (independent of autograd) and against the composed autograd path; then
the conditions under which the composed path is taken instead, and the memory the node keeps.
"""

import zlib

import pytest
import torch

from distillery.functional import _fused, forward_kl, generalized_jsd, reverse_kl, skew_kl, skew_reverse_kl
from distillery.functional._fused import KINDS, composed_gradients, fused_rows
from tests.unit.functional import reference as ref

# kind -> (mixture weight, naive row (s_row, t_row, T), library call)
CASES = {
    "forward_kl": (0.0, ref.forward_kl_row, lambda s, t, T, **kw: forward_kl(s, t, T, **kw)),
    "reverse_kl": (0.0, ref.reverse_kl_row, lambda s, t, T, **kw: reverse_kl(s, t, T, **kw)),
    "jsd": (0.3, lambda a, b, T: ref.jsd_row(a, b, T, 0.3), lambda s, t, T, **kw: generalized_jsd(s, t, 0.3, T, **kw)),
    "skew_kl": (0.2, lambda a, b, T: ref.skew_kl_row(a, b, T, 0.2), lambda s, t, T, **kw: skew_kl(s, t, 0.2, T, **kw)),
    "skew_reverse_kl": (
        0.7,
        lambda a, b, T: ref.skew_reverse_kl_row(a, b, T, 0.7),
        lambda s, t, T, **kw: skew_reverse_kl(s, t, 0.7, T, **kw),
    ),
}  # fmt: skip
SHAPES = [(1, 2), (3, 5), (4, 17), (2, 64)]


def _logits(n, c, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, c, dtype=torch.float64, generator=g),
            scale * torch.randn(n, c, dtype=torch.float64, generator=g))  # fmt: skip


def test_every_kind_is_covered():
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_values_and_gradients_match_the_naive_loops(kind, shape, T):
    weight, naive_row, _ = CASES[kind]
    s, t = _logits(*shape, seed=zlib.crc32(f"{kind}{shape}{T}".encode()))
    x = s.clone().requires_grad_()
    per_row = fused_rows(kind, x, t, T, weight)
    expected = [naive_row(a.tolist(), b.tolist(), T) for a, b in zip(s, t)]
    assert per_row.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)

    w = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)  # a different weight per row
    (per_row * w).sum().backward()
    h = 1e-6
    numeric = torch.zeros_like(s)
    for i in range(shape[0]):
        for c in range(shape[1]):
            up, down = s[i].tolist(), s[i].tolist()
            up[c] += h
            down[c] -= h
            diff = naive_row(up, t[i].tolist(), T) - naive_row(down, t[i].tolist(), T)
            numeric[i, c] = w[i] * diff / (2 * h)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: most probabilities underflow to exactly 0 in float32
def test_float32_is_as_accurate_as_the_composed_path(kind, scale):
    """In float32, the fused gradient is as close to the float64 one as the composed path's is (the
    composed autograd path is what the function computes when the teacher needs a gradient)."""
    _, _, call = CASES[kind]
    s64, t64 = _logits(6, 300, seed=7, scale=scale)
    mask = torch.tensor([True, True, False, True, True, True])

    def run(s, t, teacher_grad):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
        value = call(a, b, 2.0, mask=mask)
        value.backward()
        assert (b.grad is not None) == teacher_grad
        return value.double(), a.grad.double()

    true_value, true_grad = run(s64, t64, True)  # float64, composed
    fused_value, fused_grad = run(s64.float(), t64.float(), False)
    _, composed_grad = run(s64.float(), t64.float(), True)
    assert torch.isfinite(fused_grad).all()
    assert fused_value.item() == pytest.approx(true_value.item(), rel=1e-5, abs=1e-6)
    fused_err = (fused_grad - true_grad).abs().max().item()
    composed_err = (composed_grad - true_grad).abs().max().item()
    assert fused_err <= 4 * max(composed_err, 1e-6 * true_grad.abs().max().item())


def test_non_finite_logits_take_the_composed_path():
    s, t = _logits(2, 5, seed=3)
    s[0, 1] = -float("inf")  # a slot the student rules out
    assert fused_rows("jsd", s, t, 1.0, 0.5) is None
    x = s.clone().requires_grad_()
    value = generalized_jsd(x, t)
    value.backward()
    expected = sum(ref.jsd_row(a.tolist(), b.tolist(), 1.0, 0.5) for a, b in zip(s, t)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("weight", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["jsd", "skew_kl", "skew_reverse_kl"])
def test_the_ends_of_the_mixture_weight_take_the_composed_path(kind, weight):
    s, t = _logits(2, 5, seed=4)
    assert fused_rows(kind, s, t, 1.0, weight) is None


def test_without_gradients_nothing_is_recorded():
    s, t = _logits(3, 7, seed=5)
    x = s.clone().requires_grad_()
    with torch.no_grad():
        out = fused_rows("forward_kl", x, t, 1.0)
    assert out.grad_fn is None
    plain = fused_rows("forward_kl", s, t, 1.0)
    assert torch.equal(out, plain)


def test_the_node_keeps_one_logits_sized_tensor():
    """Saved for backward: the fused node keeps only its [N, C] gradient; the composed path more."""

    def saved_bytes(teacher_grad: bool) -> int:
        total = [0]

        def pack(x):
            total[0] += x.numel() * x.element_size()
            return x

        s, t = torch.randn(64, 1000), torch.randn(64, 1000)
        s.requires_grad_()
        t.requires_grad_(teacher_grad)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            generalized_jsd(s, t, beta=0.5)
        return total[0]

    logits_bytes = 64 * 1000 * 4
    assert saved_bytes(False) <= logits_bytes + 1024
    assert saved_bytes(True) >= 3 * logits_bytes


def test_unknown_kind_is_refused():
    s, t = _logits(1, 3, seed=6)
    with pytest.raises(ValueError, match="unknown fused divergence"):
        fused_rows("tvd", s, t, 1.0)


def test_a_second_order_gradient_is_refused_not_wrong():
    s, t = _logits(2, 5, seed=8)
    x = s.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="composed_gradients"):
        torch.autograd.grad(forward_kl(x, t), x, create_graph=True)
    with composed_gradients():  # the composed graph is differentiable twice
        (g,) = torch.autograd.grad(forward_kl(x, t), x, create_graph=True)
    (h,) = torch.autograd.grad(g[0, 0], x)
    assert h.abs().sum() > 0
    assert _fused.enabled  # switched back on after the block
    first = fused_rows("forward_kl", x, t, 1.0)
    assert first is not None and first.grad_fn is not None
