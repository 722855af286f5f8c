"""Feature hint loss against naive float64 loops, with masks, global counts and gradcheck."""

import pytest
import torch

from distillery.functional import hint_loss


def naive_hint(s, t, mask=None, num_valid=None):
    rows = [i for i in range(len(s)) if mask is None or mask[i]]
    values = []
    for i in rows:
        total = 0.0
        for f in range(len(s[i])):
            total += (s[i][f] - t[i][f]) ** 2
        values.append(total / len(s[i]))
    denominator = num_valid if num_valid is not None else max(len(values), 1)
    return sum(values) / denominator, values


@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (2, 5, 7), (3, 2, 2, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_hint_loss_matches_the_naive_loops(shape, masked):
    g = torch.Generator().manual_seed(sum(shape))
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(shape[:-1], generator=g) > 0.4) if masked else None
    rows_s, rows_t = s.reshape(-1, shape[-1]).tolist(), t.reshape(-1, shape[-1]).tolist()
    flat_mask = None if mask is None else mask.reshape(-1).tolist()
    want, per_row = naive_hint(rows_s, rows_t, flat_mask)
    assert hint_loss(s, t, mask=mask).item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert hint_loss(s, t, mask=mask, reduction="sum").item() == pytest.approx(sum(per_row), rel=1e-12)
    want_global, _ = naive_hint(rows_s, rows_t, flat_mask, num_valid=11)
    assert hint_loss(s, t, mask=mask, num_valid=11).item() == pytest.approx(want_global, rel=1e-12)
    none = hint_loss(s, t, mask=mask, reduction="none")
    assert none.shape == shape[:-1]
    kept = iter(per_row)
    for i, value in enumerate(none.reshape(-1).tolist()):
        assert value == (pytest.approx(next(kept), rel=1e-12) if flat_mask is None or flat_mask[i] else 0.0)


def test_hint_loss_gradcheck_on_both_sides():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda a, b: hint_loss(a, b, mask=mask, num_valid=7.0), (s, t))


def test_hint_loss_float32_all_masked_and_shape_errors():
    s = torch.randn(2, 3, dtype=torch.float16)
    assert hint_loss(s, s.clone()).dtype == torch.float32
    x = torch.randn(2, 3, requires_grad=True)
    loss = hint_loss(x, torch.zeros(2, 3), mask=torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    with pytest.raises(ValueError, match="project the student's features"):
        hint_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        hint_loss(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")
