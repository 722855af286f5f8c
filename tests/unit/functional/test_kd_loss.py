import math
import zlib

import pytest
import torch

from distillery.functional import forward_kl, kd_loss
from distillery.functional.kd import kd_loss_parts
from tests.unit.functional import reference as ref


def _rows(x):
    return x.reshape(-1, x.shape[-1]).double().tolist()


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 2, 3, 9)])
@pytest.mark.parametrize(
    "temperature,alpha,teacher_t", [(4.0, 0.9, None), (1.0, 0.5, None), (2.0, 1.7, None), (3.0, 0.3, 1.0)]
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_naive_reference(shape, temperature, alpha, teacher_t, masked, reduction):
    g = torch.Generator().manual_seed(
        zlib.crc32(repr((shape, temperature, alpha, masked, reduction)).encode())
    )
    s, t = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    target[torch.rand(shape[:-1], generator=g) < 0.3] = -100  # unlabelled rows
    mask = torch.rand(shape[:-1], generator=g) > 0.3 if masked else None
    got = kd_loss(
        s, t, target, temperature, alpha, teacher_temperature=teacher_t, mask=mask, reduction=reduction
    )
    valid = [True] * target.numel() if mask is None else mask.reshape(-1).tolist()
    values = [
        ref.kd_row(a, b, y, temperature, alpha, teacher_t)
        for a, b, y in zip(_rows(s), _rows(t), target.reshape(-1).tolist())
    ]
    if reduction == "mean":  # KL part over the valid rows, CE part over the labelled valid rows
        want = ref.kd_mean(
            _rows(s), _rows(t), target.reshape(-1).tolist(), valid, temperature, alpha, teacher_t
        )
    else:
        want = ref.reduce(values, valid, reduction)
    if reduction == "none":
        assert torch.allclose(
            got.double().reshape(-1), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-4
        )
    else:
        assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-5)


def test_without_targets_is_alpha_times_forward_kl():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(kd_loss(s, t, None, 3.0, 0.7), 0.7 * forward_kl(s, t, 3.0))


def test_alpha_one_ignores_labels_and_alpha_above_one_is_not_clamped():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    assert torch.allclose(kd_loss(s, t, y, 2.0, 1.0), forward_kl(s, t, 2.0))
    hi = kd_loss(s, t, y, 2.0, 1.5)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(hi, 1.5 * forward_kl(s, t, 2.0) - 0.5 * ce, atol=1e-6)


def test_gradcheck_float64():
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, -100, 3, 1, -100])
    mask = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, y, 2.0, 0.6, mask=mask, teacher_temperature=1.5), (s,)
    )


def test_all_masked_returns_zero_with_zero_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    out = kd_loss(s, torch.randn(3, 4), torch.tensor([0, 1, 2]), mask=torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_global_normalisers_make_micro_batches_sum_to_the_full_batch_gradient():
    """Four micro-batches of 2 rows with both global normalisers give the gradient of one batch of 8."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    y = torch.tensor([1, -100, -100, 2, 0, -100, 5, 3])
    mask = torch.tensor([True, True, False, True, True, True, True, False])
    full = s.clone().requires_grad_()
    kd_loss(full, t, y, 2.0, 0.5, mask=mask).backward()
    parts = s.clone().requires_grad_()
    n, n_labelled = mask.sum(), (mask & (y != -100)).sum()
    for i in range(0, 8, 2):
        kd_loss(
            parts[i : i + 2],
            t[i : i + 2],
            y[i : i + 2],
            2.0,
            0.5,
            mask=mask[i : i + 2],
            num_valid=n,
            num_labelled=n_labelled,
        ).backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-7)


def test_unlabelled_rows_split_unevenly_over_micro_batches_sum_to_the_full_batch():
    """Micro-batches with 0, 1 and 3 labelled rows (and masked rows) sum to the whole batch's value."""
    g = torch.Generator().manual_seed(11)
    s, t = (
        torch.randn(9, 5, generator=g, dtype=torch.float64),
        torch.randn(9, 5, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([-100, -100, -100, 4, -100, 0, 2, 1, -100])
    mask = torch.tensor([True, True, False, True, True, True, True, True, False])
    full = kd_loss(s, t, y, 3.0, 0.4, mask=mask)
    n, n_labelled = mask.sum(), (mask & (y != -100)).sum()
    total = sum(
        kd_loss(s[p], t[p], y[p], 3.0, 0.4, mask=mask[p], num_valid=n, num_labelled=n_labelled)
        for p in (slice(0, 3), slice(3, 5), slice(5, 9))
    )
    assert total.item() == pytest.approx(full.item(), rel=1e-12)


def test_mean_follows_pytorch_ignore_index_convention():
    """The CE part is F.cross_entropy(..., ignore_index=-100): the mean over the labelled rows only."""
    g = torch.Generator().manual_seed(5)
    s, t = (
        torch.randn(7, 4, generator=g, dtype=torch.float64),
        torch.randn(7, 4, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([2, -100, -100, 0, -100, 3, -100])
    mask = torch.tensor([True, True, True, True, False, False, True])  # row 5 is labelled but masked
    keep = mask.nonzero().squeeze(-1)
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep], ignore_index=-100)
    want = 0.3 * forward_kl(s[keep], t[keep], 2.0) + 0.7 * ce
    assert kd_loss(s, t, y, 2.0, 0.3, mask=mask).item() == pytest.approx(want.item(), rel=1e-12)
    # the previous convention (CE summed over labelled rows / all valid rows) is still one argument away
    old = 0.3 * forward_kl(s[keep], t[keep], 2.0) + 0.7 * ce * 2 / 5
    got = kd_loss(s, t, y, 2.0, 0.3, mask=mask, num_labelled=mask.sum())
    assert got.item() == pytest.approx(old.item(), rel=1e-12)


def test_parts_reproduce_mean_and_none():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    y = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    distill, label = kd_loss_parts(s, t, y, 2.0, 0.6, mask=mask)
    labelled = mask & (y != -100)
    assert torch.equal(label[~labelled], torch.zeros(int((~labelled).sum()))) and torch.all(
        distill[~mask] == 0
    )
    mean = distill.sum() / mask.sum() + label.sum() / labelled.sum()
    assert torch.allclose(kd_loss(s, t, y, 2.0, 0.6, mask=mask), mean, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, 2.0, 0.6, mask=mask, reduction="none"), distill + label)
    distill, label = kd_loss_parts(s, t, None, 2.0, 0.6)
    assert torch.equal(label, torch.zeros(2, 3)) and torch.allclose(
        distill, kd_loss(s, t, None, 2.0, 0.6, reduction="none")
    )
