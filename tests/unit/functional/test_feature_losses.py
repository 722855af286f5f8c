"""feature_distance and attention_transfer against naive float64 loops, then their properties.

The references at the end of this file are written from the papers' equations (and, for attention
transfer, the official code's averaging) with Python lists, loops and the math module only.
"""

import math
import zlib

import pytest
import torch

from distillery.functional import attention_transfer, feature_distance, hint_loss

KINDS = ["mse", "smooth_l1", "cosine"]


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------------------------------------
# feature_distance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (2, 5, 7), (3, 2, 2, 4)])
@pytest.mark.parametrize("kind,beta", [("mse", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.3), ("cosine", 1.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_feature_distance_matches_the_naive_loops(shape, kind, beta, masked):
    g = _seed(shape, kind, beta, masked)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(shape[:-1], generator=g) > 0.4) if masked else None
    rows_s, rows_t = s.reshape(-1, shape[-1]).tolist(), t.reshape(-1, shape[-1]).tolist()
    valid = [True] * len(rows_s) if mask is None else mask.reshape(-1).tolist()
    per_row = [naive_distance_row(a, b, kind, beta) for a, b in zip(rows_s, rows_t)]
    kept = [v for v, ok in zip(per_row, valid) if ok]
    kw = {"kind": kind, "beta": beta, "mask": mask}
    mean = sum(kept) / max(len(kept), 1)
    assert feature_distance(s, t, **kw).item() == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert feature_distance(s, t, reduction="sum", **kw).item() == pytest.approx(
        sum(kept), rel=1e-12, abs=1e-15
    )
    assert feature_distance(s, t, num_valid=11, **kw).item() == pytest.approx(
        sum(kept) / 11, rel=1e-12, abs=1e-15
    )
    none = feature_distance(s, t, reduction="none", **kw)
    assert none.shape == shape[:-1] and none.dtype == torch.float64
    for got, want, ok in zip(none.reshape(-1).tolist(), per_row, valid):
        assert got == (pytest.approx(want, rel=1e-12, abs=1e-15) if ok else 0.0)


def test_mse_is_the_hint_loss_and_smooth_l1_is_torchs():
    g = _seed("mse")
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            feature_distance(s, t, mask=mask, reduction=reduction),
            hint_loss(s, t, mask=mask, reduction=reduction),
        )
    want = torch.nn.functional.smooth_l1_loss(s, t, beta=0.5)
    assert torch.allclose(feature_distance(s, t, kind="smooth_l1", beta=0.5), want, rtol=1e-6)
    l1 = torch.nn.functional.l1_loss(s, t)
    assert torch.allclose(feature_distance(s, t, kind="smooth_l1", beta=0.0), l1, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_feature_distance_gradcheck_on_both_sides(kind):
    g = _seed("grad", kind)
    s = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, generator=g) > 0.3
    assert torch.autograd.gradcheck(
        lambda a, b: feature_distance(a, b, kind=kind, beta=0.7, mask=mask, num_valid=7.0), (s, t)
    )


def test_cosine_ignores_each_rows_scale_and_is_zero_for_parallel_rows():
    g = _seed("cosine")
    s, t = (
        torch.randn(6, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 8, generator=g, dtype=torch.float64),
    )
    scale_s = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    scale_t = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    base = feature_distance(s, t, kind="cosine", reduction="none")
    scaled = feature_distance(s * scale_s, t * scale_t, kind="cosine", reduction="none")
    assert torch.allclose(base, scaled, rtol=1e-12, atol=1e-14)
    assert feature_distance(s, 3 * s, kind="cosine").abs().item() < 1e-14
    assert feature_distance(s, -s, kind="cosine").item() == pytest.approx(2.0, rel=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_feature_distance_masked_rows_change_nothing(kind):
    g = _seed("padding", kind)
    s, t = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.5
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = float("nan"), 1e6
    for reduction in ("mean", "sum", "none"):
        a = feature_distance(s, t, kind=kind, mask=mask, reduction=reduction)
        b = feature_distance(s2, t2, kind=kind, mask=mask, reduction=reduction)
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_feature_distance_float32_all_masked_and_zero_rows(kind):
    s = torch.randn(2, 3, dtype=torch.float16)
    assert feature_distance(s, s.clone(), kind=kind).dtype == torch.float32
    x = torch.randn(2, 3, requires_grad=True)
    loss = feature_distance(x, torch.zeros(2, 3), kind=kind, mask=torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    z = torch.zeros(2, 3, requires_grad=True)  # a zero row: cosine is 1 - 0, with finite gradients
    out = feature_distance(z, torch.ones(2, 3), kind=kind)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_feature_distance_errors():
    with pytest.raises(ValueError, match="project the student's features"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind must be one of cosine, mse, smooth_l1"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), kind="l2")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), kind="smooth_l1", beta=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="non-empty last"):
        feature_distance(torch.zeros(2, 0), torch.zeros(2, 0))


# ---------------------------------------------------------------------------------------------
# attention_transfer
# ---------------------------------------------------------------------------------------------

AT_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 4, 4), (3, 4, 2, 2, 5), (2, 6, 6, 3, 2)]  # (B, C_s, C_t, H, W)


@pytest.mark.parametrize("dims", AT_SHAPES)
@pytest.mark.parametrize("p", [2, 1, 3, 1.5])
def test_attention_transfer_matches_the_naive_loops(dims, p):
    b, c_s, c_t, h, w = dims
    g = _seed(dims, p)
    s = torch.randn(b, c_s, h, w, generator=g, dtype=torch.float64)
    t = torch.randn(b, c_t, h, w, generator=g, dtype=torch.float64) * 2
    per_sample = naive_attention_transfer(s.tolist(), t.tolist(), p)
    assert attention_transfer(s, t, p=p).item() == pytest.approx(sum(per_sample) / b, rel=1e-10, abs=1e-15)
    assert attention_transfer(s, t, p=p, reduction="sum").item() == pytest.approx(
        sum(per_sample), rel=1e-10, abs=1e-15
    )
    none = attention_transfer(s, t, p=p, reduction="none")
    assert none.shape == (b,)
    for got, want in zip(none.tolist(), per_sample):
        assert got == pytest.approx(want, rel=1e-10, abs=1e-15)


def test_attention_transfer_is_the_official_formula_at_p_2():
    g = _seed("official")
    s, t = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 7, 5, 6, generator=g)

    def at(x):  # szagoruyko/attention-transfer's at(): channel mean of x^2, L2-normalised per sample
        return torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    official = (at(s) - at(t)).pow(2).mean()
    assert torch.allclose(attention_transfer(s, t), official, rtol=1e-6, atol=1e-9)


def test_attention_transfer_gradcheck_on_both_sides():
    g = _seed("at-grad")
    s = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for p in (2, 3):
        assert torch.autograd.gradcheck(lambda a, b, p=p: attention_transfer(a, b, p=p), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: attention_transfer(a, b, reduction="none"), (s, t))


@pytest.mark.parametrize("p", [2, 1, 3])
def test_attention_transfer_ignores_scale_and_is_zero_for_the_same_attention(p):
    g = _seed("at-scale", p)
    s = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, 5, 5, generator=g, dtype=torch.float64)
    base = attention_transfer(s, t, p=p, reduction="none")
    for c_s, c_t in ((7.5, 1.0), (1.0, 0.01), (3.0, 40.0)):
        assert torch.allclose(attention_transfer(c_s * s, c_t * t, p=p, reduction="none"), base, rtol=1e-12)
    assert attention_transfer(s, s.clone(), p=p).item() == 0.0
    # Repeating or negating channels leaves the channel mean of |A|^p and so the attention unchanged.
    assert attention_transfer(s, torch.cat([s, -s], dim=1), p=p).abs().item() < 1e-15
    assert (base > 0).all()


def test_attention_transfer_float32_and_errors():
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    assert attention_transfer(x, x.clone()).dtype == torch.float32
    zero = torch.zeros(2, 3, 4, 4, requires_grad=True)  # an all-zero map: finite value and gradient
    out = attention_transfer(zero, torch.randn(2, 5, 4, 4))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match=r"spatial size.*interpolate"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch size"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        attention_transfer(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="p must be > 0"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), p=0)
    with pytest.raises(ValueError, match="reduction"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), reduction="batchmean")


# ---------------------------------------------------------------------------------------------
# Naive references (float64 Python loops, no vectorised torch maths)
# ---------------------------------------------------------------------------------------------


def naive_distance_row(s, t, kind, beta):
    if kind == "mse":
        return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)
    if kind == "smooth_l1":
        total = 0.0
        for a, b in zip(s, t):
            d = abs(a - b)
            total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
        return total / len(s)
    dot = sum(a * b for a, b in zip(s, t))
    norm_s = max(math.sqrt(sum(a * a for a in s)), 1e-8)
    norm_t = max(math.sqrt(sum(b * b for b in t)), 1e-8)
    return 1.0 - dot / (norm_s * norm_t)


def naive_attention_map(sample, p):
    """``[C][H][W]`` -> the flattened, L2-normalised channel mean of ``|A|^p``."""
    channels, height, width = len(sample), len(sample[0]), len(sample[0][0])
    q = []
    for h in range(height):
        for w in range(width):
            q.append(sum(abs(sample[c][h][w]) ** p for c in range(channels)) / channels)
    norm = max(math.sqrt(sum(v * v for v in q)), 1e-12)
    return [v / norm for v in q]


def naive_attention_transfer(s, t, p):
    """Per sample: the squared difference of the attention maps averaged over the H*W positions."""
    out = []
    for s_b, t_b in zip(s, t):
        a_s, a_t = naive_attention_map(s_b, p), naive_attention_map(t_b, p)
        out.append(sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / len(a_s))
    return out
