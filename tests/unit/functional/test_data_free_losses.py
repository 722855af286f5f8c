"""DeepInversion's losses against float64 loops written from the paper's equations, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.functional import batch_norm_statistics, bn_feature_loss, image_l2, image_total_variation


def naive_stats(x: list, channels: int):
    """x: nested lists [B][C][H][W] (or [B][C]); mean and biased variance per channel."""
    values = [[] for _ in range(channels)]
    for sample in x:
        for c in range(channels):
            plane = sample[c]
            flat = plane if isinstance(plane, float) else [v for row in plane for v in row]
            values[c] += [flat] if isinstance(flat, float) else flat
    means = [sum(v) / len(v) for v in values]
    variances = [sum((a - m) ** 2 for a in v) / len(v) for v, m in zip(values, means)]
    return means, variances


def norm(values) -> float:
    return math.sqrt(sum(v * v for v in values))


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3), (2, 4, 5, 2)])
def test_batch_statistics_match_a_loop(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    mean, var = batch_norm_statistics(x)
    m_ref, v_ref = naive_stats(x.tolist(), shape[1])
    assert mean.tolist() == pytest.approx(m_ref, abs=1e-12)
    assert var.tolist() == pytest.approx(v_ref, abs=1e-12)


@pytest.mark.parametrize("channels", [[3], [2, 5], [4, 1, 6]])
def test_bn_feature_loss_matches_the_sum_of_norms(channels):
    g = torch.Generator().manual_seed(len(channels))
    ms, vs, rms, rvs = (
        [torch.randn(c, generator=g, dtype=torch.float64) for c in channels] for _ in range(4)
    )
    vs, rvs = [v.abs() for v in vs], [v.abs() for v in rvs]
    weights = [10.0] + [1.0] * (len(channels) - 1)
    got = bn_feature_loss(ms, vs, rms, rvs, weights)
    want = sum(
        w
        * (
            norm([a - b for a, b in zip(m.tolist(), rm.tolist())])
            + norm([a - b for a, b in zip(v.tolist(), rv.tolist())])
        )
        for w, m, v, rm, rv in zip(weights, ms, vs, rms, rvs)
    )
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(bn_feature_loss(rms, rvs, rms, rvs)) == 0.0  # stored statistics: nothing to pay


def naive_tv(x: list) -> float:
    total = 0.0
    for dy, dx in ((0, 1), (1, 0), (1, -1), (1, 1)):
        acc = 0.0
        for sample in x:
            for plane in sample:
                h, w = len(plane), len(plane[0])
                for i in range(h):
                    for j in range(w):
                        # pairs (i, j) and (i + dy, j + dx), both inside
                        if dx == -1:  # the anti-diagonal: x[i+1][j] vs x[i][j+1]
                            if i + 1 < h and j + 1 < w:
                                acc += (plane[i + 1][j] - plane[i][j + 1]) ** 2
                        elif i + dy < h and j + dx < w:
                            acc += (plane[i][j] - plane[i + dy][j + dx]) ** 2
        total += math.sqrt(acc)
    return total


@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (2, 3, 4, 5), (3, 1, 2, 6)])
def test_total_variation_and_l2_match_loops(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert float(image_total_variation(x)) == pytest.approx(naive_tv(x.tolist()), rel=1e-6)
    assert float(image_l2(x)) == pytest.approx(norm(x.reshape(-1).tolist()), rel=1e-6)
    assert float(image_total_variation(torch.ones(shape))) == 0.0


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rm, rv = (
        torch.randn(2, dtype=torch.float64, generator=g),
        torch.rand(2, dtype=torch.float64, generator=g) + 0.5,
    )

    def feature(x):
        m, v = batch_norm_statistics(x)
        return bn_feature_loss([m], [v], [rm], [rv], [2.0])

    assert torch.autograd.gradcheck(feature, (x,))
    assert torch.autograd.gradcheck(image_total_variation, (x,))
    assert torch.autograd.gradcheck(image_l2, (x,))
