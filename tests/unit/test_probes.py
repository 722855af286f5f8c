"""The weighted k-NN probe against a naive loop, and its properties."""

import math

import pytest
import torch

from distillery.eval.probes import knn_accuracy, linear_probe


def naive_knn(train, y_train, test, y_test, k, T):
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    train = [unit(v) for v in train]
    correct = 0
    for z, y in zip(test, y_test):
        z = unit(z)
        sims = sorted(
            ((sum(a * b for a, b in zip(z, t)), i) for i, t in enumerate(train)), key=lambda p: -p[0]
        )
        votes = {}
        for s, i in sims[:k]:
            votes[y_train[i]] = votes.get(y_train[i], 0.0) + math.exp(s / T)
        best = max(sorted(votes), key=lambda c: votes[c])  # ties: the smaller class
        correct += best == y
    return correct / len(test)


@pytest.mark.parametrize(
    "n,m,d,c,k", [(10, 5, 3, 2, 1), (40, 30, 8, 4, 5), (60, 25, 16, 10, 20), (8, 6, 4, 3, 50)]
)
@pytest.mark.parametrize("T", [0.07, 1.0])
def test_knn_matches_the_loop(n, m, d, c, k, T):
    g = torch.Generator().manual_seed(n * 31 + k)
    centres = torch.randn(c, d, generator=g) * 2
    y_train, y_test = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (m,), generator=g)
    train = centres[y_train] + torch.randn(n, d, generator=g)
    test = centres[y_test] + torch.randn(m, d, generator=g)
    got = knn_accuracy(train, y_train, test, y_test, k=k, temperature=T, num_classes=c, chunk=7)
    want = naive_knn(train.double().tolist(), y_train.tolist(), test.double().tolist(), y_test.tolist(), k, T)
    assert got == pytest.approx(want)


def test_knn_is_scale_invariant_and_separates_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g) + 5, torch.randn(50, 4, generator=g) - 5])
    y = torch.tensor([0] * 50 + [1] * 50)
    acc = knn_accuracy(x[::2], y[::2], x[1::2], y[1::2])
    assert acc == 1.0
    assert knn_accuracy(3 * x[::2], y[::2], 0.1 * x[1::2], y[1::2]) == acc
    noise = knn_accuracy(torch.randn(200, 8, generator=g), torch.randint(0, 2, (200,), generator=g),
                         torch.randn(200, 8, generator=g), torch.randint(0, 2, (200,), generator=g))  # fmt: skip
    assert 0.3 < noise < 0.7
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x, y, x, y, temperature=0.0)


def test_linear_probe_lives_in_probes_and_the_encoder_metrics_use_it():
    from distillery.eval import encoder

    assert encoder.linear_probe is linear_probe


def test_embedding_spread_is_zero_for_one_point_and_about_one_over_root_d_when_spread():
    from distillery.eval.probes import embedding_spread

    assert embedding_spread(torch.ones(10, 4) * 3) == 0.0
    spread = embedding_spread(torch.randn(5000, 16, generator=torch.Generator().manual_seed(0)))
    assert spread == pytest.approx(1 / 16**0.5, rel=0.05)
