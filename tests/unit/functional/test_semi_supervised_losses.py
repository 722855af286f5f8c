"""FixMatch / Noisy Student pseudo-labels and Mean Teacher's consistency cost against float64 loops
written from the papers' equations (the official code's 1/C for the consistency cost)."""

import math
import zlib

import pytest
import torch

from distillery.functional import consistency_mse, pseudo_label_loss


def _g(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _softmax(row, temperature=1.0):
    m = max(row)
    e = [math.exp((v - m) / temperature) for v in row]
    z = sum(e)
    return [v / z for v in e]


def naive_pseudo_label(s, t, threshold, hard, temperature, mask):
    total, count = 0.0, 0
    for srow, trow, keep in zip(s, t, mask):
        if not keep:
            continue
        count += 1
        q = _softmax(trow, temperature)
        p = _softmax(srow)
        if max(q) < threshold:
            continue
        if hard:
            label = q.index(max(q))
            total += -math.log(p[label])
        else:
            total += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
    return total / max(count, 1)


def naive_consistency(s, t, temperature, mask):
    total, count = 0.0, 0
    for srow, trow, keep in zip(s, t, mask):
        if not keep:
            continue
        count += 1
        p, q = _softmax(srow, temperature), _softmax(trow, temperature)
        total += sum((a - b) ** 2 for a, b in zip(p, q)) / len(p)
    return total / max(count, 1)


SHAPES = [(1, 2), (5, 3), (8, 10), (16, 4)]


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_pseudo_label_matches_the_loop(n, c, threshold, hard, temperature):
    g = _g("pl", n, c, threshold, hard, temperature)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(n, generator=g) > 0.2
    got = pseudo_label_loss(s, t, threshold, hard=hard, temperature=temperature, mask=mask)
    want = naive_pseudo_label(s.tolist(), t.tolist(), threshold, hard, temperature, mask.tolist())
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_consistency_mse_matches_the_loop(n, c, temperature):
    g = _g("mt", n, c, temperature)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(n, generator=g) > 0.2
    got = consistency_mse(s, t, temperature, mask=mask)
    want = naive_consistency(s.tolist(), t.tolist(), temperature, mask.tolist())
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_leading_dims_and_reductions():
    g = _g("lead")
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g) * 4
    rows = pseudo_label_loss(s, t, 0.5, reduction="none")
    assert rows.shape == (2, 3)
    assert pseudo_label_loss(s, t, 0.5).item() == pytest.approx(rows.mean().item(), rel=1e-6)
    assert pseudo_label_loss(s, t, 0.5, reduction="sum").item() == pytest.approx(rows.sum().item(), rel=1e-6)
    assert pseudo_label_loss(s, t, 0.5, num_valid=12).item() == pytest.approx(
        rows.sum().item() / 12, rel=1e-6
    )
    m = consistency_mse(s, t, reduction="none")
    assert m.shape == (2, 3) and consistency_mse(s, t).item() == pytest.approx(m.mean().item(), rel=1e-6)


def test_threshold_one_keeps_nothing_but_stays_in_the_graph():
    s = torch.randn(4, 3, requires_grad=True)
    loss = pseudo_label_loss(s, torch.randn(4, 3), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_no_gradient_reaches_the_teacher():
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    (pseudo_label_loss(s, t, 0.0, hard=False) + consistency_mse(s, t)).backward()
    assert t.grad is None and s.grad is not None


def test_gradcheck():
    g = _g("gradcheck")
    s = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([True, True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda x: pseudo_label_loss(x, t, 0.4, mask=mask), (s,))
    assert torch.autograd.gradcheck(lambda x: pseudo_label_loss(x, t, 0.4, hard=False, mask=mask), (s,))
    assert torch.autograd.gradcheck(lambda x: consistency_mse(x, t, 2.0, mask=mask), (s,))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s, t: pseudo_label_loss(s, t, 1.5), "threshold"),
        (lambda s, t: pseudo_label_loss(s, t, 0.5, temperature=0.0), "temperature"),
        (lambda s, t: consistency_mse(s, t, -1.0), "temperature"),
        (lambda s, t: consistency_mse(s, t[:2]), "leading"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 4), torch.randn(3, 4))
