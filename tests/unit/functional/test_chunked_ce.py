"""chunked_cross_entropy_from_hidden against a naive float64 loop over tokens and classes."""

import math

import pytest
import torch

from distillery.functional.chunked import chunked_cross_entropy_from_hidden


def naive_ce(h, w, b, y, mask, smoothing, num_valid):
    """-sum_i [(1-eps) log p_i(y_i) + eps/V sum_c log p_i(c)] / N over labelled valid rows (lists)."""
    total, rows = 0.0, 0
    v = len(w)
    for i in range(len(h)):
        if y[i] == -100 or (mask is not None and not mask[i]):
            continue
        logits = [sum(h[i][k] * w[c][k] for k in range(len(h[i]))) + (b[c] if b else 0.0) for c in range(v)]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(z - top) for z in logits))
        log_p = [z - log_z for z in logits]
        total += -((1 - smoothing) * log_p[y[i]] + smoothing / v * sum(log_p))
        rows += 1
    return total / (num_valid if num_valid is not None else max(rows, 1))


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize(
    ("lead", "hidden", "vocab", "bias", "masked", "smoothing", "num_valid"),
    [
        ((7,), 4, 5, False, False, 0.0, None),
        ((2, 5), 6, 11, True, True, 0.1, None),
        ((3, 3), 3, 7, True, False, 0.0, 20),
    ],
)
def test_matches_the_naive_loop_in_value_and_gradient(
    chunk_size, lead, hidden, vocab, bias, masked, smoothing, num_valid
):
    g = torch.Generator().manual_seed(chunk_size * 1000 + vocab)
    h = torch.randn(*lead, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, lead, generator=g)
    y.view(-1)[1] = -100
    mask = torch.rand(lead, generator=g) > 0.3 if masked else None
    loss = chunked_cross_entropy_from_hidden(
        h, w, y, head_bias=b, mask=mask, num_valid=num_valid, label_smoothing=smoothing, chunk_size=chunk_size
    )
    flat_h = h.detach().reshape(-1, hidden).tolist()
    want = naive_ce(flat_h, w.detach().tolist(), None if b is None else b.detach().tolist(), y.reshape(-1).tolist(),
                    None if mask is None else mask.reshape(-1).tolist(), smoothing, num_valid)  # fmt: skip
    assert loss.item() == pytest.approx(want, rel=1e-10)
    params = [x for x in (h, w, b) if x is not None]
    got = torch.autograd.grad(loss, params)
    # the naive gradient: autograd through the full logits
    logits = h @ w.T + (0 if b is None else b)
    rows = (y != -100) if mask is None else (y != -100) & mask
    naive = torch.nn.functional.cross_entropy(
        logits[rows], y[rows], reduction="sum", label_smoothing=smoothing
    )
    naive = naive / (num_valid if num_valid is not None else max(int(rows.sum()), 1))
    for a, e in zip(got, torch.autograd.grad(naive, params)):
        assert torch.allclose(a, e, atol=1e-12)
    if masked:  # masked and unlabelled tokens get no gradient
        assert not got[0][~rows].any()


def test_gradcheck_and_sum_reduction():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, -100, 2, 2])
    assert torch.autograd.gradcheck(
        lambda a, b: chunked_cross_entropy_from_hidden(a, b, y, chunk_size=2), (h, w)
    )
    mean = chunked_cross_entropy_from_hidden(h, w, y)
    assert chunked_cross_entropy_from_hidden(h, w, y, reduction="sum").item() == pytest.approx(
        4 * mean.item()
    )


def test_float32_no_labels_and_errors():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    none = chunked_cross_entropy_from_hidden(h, w, torch.full((4,), -100))
    none.backward()
    assert none.item() == 0.0 and not h.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match="outside"):
        chunked_cross_entropy_from_hidden(h, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match='not "none"'):
        chunked_cross_entropy_from_hidden(h, w, torch.zeros(4, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="target has shape"):
        chunked_cross_entropy_from_hidden(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask has shape"):
        chunked_cross_entropy_from_hidden(
            h, w, torch.zeros(4, dtype=torch.long), mask=torch.ones(2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        chunked_cross_entropy_from_hidden(h, w, torch.zeros(4, dtype=torch.long), label_smoothing=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_from_hidden(h, w, torch.zeros(4, dtype=torch.long), chunk_size=0)
