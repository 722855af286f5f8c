"""USKD against a naive float64 loop implementation, and gradcheck with fixed soft labels.

The Zipf ranking follows the official code (yzd-v/cls_KD, ``mmcls/models/dis_losses/uskd.py``): all C
classes are ranked, the target included, by ``log s(k) / (1 - log s(y) + 1e-6)`` (plus the weak
head's ``w(k) / (1 - w(y) + 1e-6)`` when there is one); the target's weight is then dropped and the
rest renormalised.
"""

import math

import pytest
import torch

from distillery.functional import uskd_loss
from tests.unit.functional.reference import softmax


def naive_zipf(src_row, y, weak_row=None):
    """Official ranking, written with loops: Zipf weights of the non-target classes (a dict)."""
    c = len(src_row)
    log_s = [math.log(v) for v in softmax(src_row)]
    scores = [log_s[k] / (1.0 - log_s[y] + 1e-6) for k in range(c)]
    if weak_row is not None:
        w = softmax(weak_row)
        scores = [scores[k] + w[k] / (1.0 - w[y] + 1e-6) for k in range(c)]
    order = sorted(range(c), key=lambda k: (-scores[k], k))  # highest first, ties in class order
    rank = {k: r + 1 for r, k in enumerate(order)}  # ranks 1..C, the target included
    total = sum(1.0 / rank[k] for k in range(c) if k != y)
    return {k: (1.0 / rank[k]) / total for k in range(c) if k != y}


def naive_uskd(z, y, alpha, beta, src=None, mask=None, weak=None):
    src = z if src is None else src
    rows = [i for i in range(len(z)) if y[i] != -100 and (mask is None or mask[i])]
    conf = {i: softmax(src[i])[y[i]] ** 2 for i in rows}
    mean_conf = sum(conf.values()) / len(rows) if rows else 0.0
    c = len(z[0])
    values = []
    for i in rows:
        p = softmax(z[i])
        others = [k for k in range(c) if k != y[i]]
        q = dict(zip(others, softmax([z[i][k] for k in others])))
        zipf = naive_zipf(src[i], y[i], None if weak is None else weak[i])
        target = -(1 + conf[i] - mean_conf) * math.log(p[y[i]])
        non_target = -sum(zipf[k] * math.log(q[k]) for k in others)
        values.append(alpha * target + beta * non_target)
    return sum(values) / max(len(values), 1)


@pytest.mark.parametrize(("n", "c"), [(3, 4), (5, 2), (6, 10)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.1), (0.5, 2.0)])
def test_uskd_matches_the_naive_loops(n, c, masked, alpha, beta):
    g = torch.Generator().manual_seed(n * 100 + c)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    y[0] = -100
    mask = torch.rand(n, generator=g) > 0.3 if masked else None
    got = uskd_loss(z, y, alpha, beta, mask=mask)
    want = naive_uskd(z.tolist(), y.tolist(), alpha, beta, mask=None if mask is None else mask.tolist())
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c"), [(4, 3), (7, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_uskd_with_a_weak_head_matches_the_naive_loops(n, c, masked):
    g = torch.Generator().manual_seed(n * 1000 + c)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    weak = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = -100
    mask = torch.rand(n, generator=g) > 0.3 if masked else None
    got = uskd_loss(z, y, 1.0, 0.5, weak_logits=weak, mask=mask)
    want = naive_uskd(
        z.tolist(), y.tolist(), 1.0, 0.5, mask=None if mask is None else mask.tolist(), weak=weak.tolist()
    )
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def official_uskd_without_weak_loss(logit_s, w_fc, gt_label, alpha, beta):
    """``USKDLoss.forward`` of yzd-v/cls_KD transcribed (hard labels; the weak head's own loss left out)."""
    label = gt_label.view(len(gt_label), 1)
    value = torch.ones_like(label)
    n, c = logit_s.shape
    s_i = torch.softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    p_t = s_t**2
    p_t = p_t + value - p_t.mean(0, True)
    p_t[value == 0] = 0
    s_i = torch.log_softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    loss_t = -(p_t * s_t).sum(dim=1).mean()
    w_i = torch.softmax(w_fc, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + s_i / (1 - s_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = (1 / torch.arange(1, c + 1, dtype=logit_s.dtype)).repeat(n, 1)
    z_i = torch.gather(z_i, dim=1, index=torch.argsort(rank))
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    ns_i = torch.log_softmax(logit_s[mask].reshape(n, -1), dim=1)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = nz_i / nz_i.sum(dim=1, keepdim=True)
    loss_non = -(nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non


@pytest.mark.parametrize(("n", "c"), [(5, 4), (8, 10)])
def test_uskd_with_a_weak_head_equals_the_official_code(n, c):
    g = torch.Generator().manual_seed(7 * n + c)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    weak = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    got = uskd_loss(z, y, 0.7, 0.3, weak_logits=weak)
    want = official_uskd_without_weak_loss(z, weak, y, 0.7, 0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_uskd_ranks_the_target_among_all_classes():
    """The bug report's example: Zipf 1/2, 1/3, 1/4 over the non-target classes, not 1, 1/2, 1/3."""
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    got = uskd_loss(z, torch.tensor([0]), alpha=0.0, beta=1.0)
    q = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), dim=-1)
    want = -(torch.tensor([6.0, 4.0, 3.0], dtype=torch.float64) / 13 * q).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.item() == pytest.approx(1.17684, abs=1e-5)


def test_uskd_soft_labels_have_no_gradient_and_gradcheck_with_fixed_labels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    src = torch.randn(4, 5, generator=g, dtype=torch.float64)
    weak = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    assert torch.autograd.gradcheck(lambda x: uskd_loss(x, y, 1.0, 0.5, soft_label_logits=src), (z,))
    assert torch.autograd.gradcheck(
        lambda x: uskd_loss(x, y, 1.0, 0.5, soft_label_logits=src, weak_logits=weak), (z,)
    )
    want = naive_uskd(z.tolist(), y.tolist(), 1.0, 0.5, src=src.tolist())
    assert uskd_loss(z, y, 1.0, 0.5, soft_label_logits=src).item() == pytest.approx(want, rel=1e-9)


def test_uskd_all_unlabelled_is_zero_without_nan():
    z = torch.randn(3, 4, requires_grad=True)
    loss = uskd_loss(z, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
