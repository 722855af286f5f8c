import math

import pytest
import torch

from distillery.functional import cross_entropy, mean_probability_logits
from tests.unit.functional import reference as ref


@pytest.mark.parametrize("shape", [(6, 3), (2, 4, 5)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_naive_over_labelled_rows(shape, smoothing):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[::3] = -100
    got = cross_entropy(s, y, label_smoothing=smoothing)
    values = []
    for row, label in zip(s.reshape(-1, shape[-1]).double().tolist(), y.reshape(-1).tolist()):
        if label == -100:
            continue
        p = ref.softmax(row)
        c = len(row)
        target = [(1 - smoothing) * (k == label) + smoothing / c for k in range(c)]
        values.append(-sum(tk * math.log(pk) for tk, pk in zip(target, p)))
    assert math.isclose(got.item(), sum(values) / len(values), rel_tol=1e-5)


def test_cross_entropy_gradcheck_and_empty():
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, -100, 1])
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, y), (s,))
    out = cross_entropy(s, torch.full((4,), -100))
    out.backward()
    assert out.item() == 0.0


def test_mean_probability_logits_softmax_is_the_mean_probability():
    z = torch.randn(3, 5, 7)
    got = mean_probability_logits(z).softmax(-1)
    assert torch.allclose(got, z.softmax(-1).mean(0), atol=1e-6)
    w = torch.tensor([1.0, 2.0, 1.0])
    got_w = mean_probability_logits(z, w).softmax(-1)
    want_w = (z.softmax(-1) * (w / w.sum())[:, None, None]).sum(0)
    assert torch.allclose(got_w, want_w, atol=1e-6)
