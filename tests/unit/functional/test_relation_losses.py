"""rkd_distance, rkd_angle, similarity_preserving and linear_cka_loss against naive float64 loops.

Then their invariances (scaling, translation, orthogonal maps), masks, the few-rows rule, gradients,
dtypes and errors. The references at the end of this file use Python lists, loops and the math
module only.
"""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.functional import linear_cka_loss, rkd_angle, rkd_distance, similarity_preserving

FUNCTIONS = {
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "similarity_preserving": similarity_preserving,
    "linear_cka_loss": linear_cka_loss,
}
MIN_ROWS = {"rkd_distance": 2, "rkd_angle": 3, "similarity_preserving": 2, "linear_cka_loss": 2}

# (N, D_s, D_t): widths differ; for CKA (3, 5, 2), (4, 8, 6) take the Gram path (N^2 <= D_s D_t)
SHAPES = [(3, 2, 4), (3, 5, 2), (5, 3, 3), (4, 8, 6), (7, 6, 2), (10, 4, 9)]


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _orthogonal(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _naive(name, s, t):
    return {
        "rkd_distance": naive_rkd_distance,
        "rkd_angle": naive_rkd_angle,
        "similarity_preserving": naive_similarity_preserving,
        "linear_cka_loss": naive_linear_cka_loss,
    }[name](s, t)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_naive_loops(name, dims, masked):
    n, d_s, d_t = dims
    g = _seed(name, dims, masked)
    s = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    t = torch.randn(n, d_t, generator=g, dtype=torch.float64) * 3 + 1
    mask = None
    rows_s, rows_t = s.tolist(), t.tolist()
    if masked:
        mask = torch.rand(n, generator=g) > 0.3
        mask[: MIN_ROWS[name]] = True  # keep enough rows for the relation
        rows_s = [r for r, ok in zip(rows_s, mask.tolist()) if ok]
        rows_t = [r for r, ok in zip(rows_t, mask.tolist()) if ok]
    got = FUNCTIONS[name](s, t, mask=mask)
    assert got.shape == () and got.dtype == torch.float64
    assert got.item() == pytest.approx(_naive(name, rows_s, rows_t), rel=1e-10, abs=1e-14)


def test_similarity_preserving_flattens_feature_maps():
    g = _seed("sp-maps")
    s = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    want = naive_similarity_preserving(s.reshape(4, -1).tolist(), t.reshape(4, -1).tolist())
    assert similarity_preserving(s, t).item() == pytest.approx(want, rel=1e-10)


def test_rkd_averages_over_every_entry_as_the_official_code_does():
    """Distance: N^2 entries (diagonal included); angle: N^3 entries (degenerate triples included)."""
    g = _seed("official")
    n = 6
    s = torch.randn(n, 4, generator=g, dtype=torch.float64)
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    off_diagonal = naive_rkd_distance(s.tolist(), t.tolist(), include_diagonal=False)
    assert rkd_distance(s, t).item() == pytest.approx(off_diagonal * (n - 1) / n, rel=1e-10)
    proper = naive_rkd_angle(s.tolist(), t.tolist(), proper_triples_only=True)
    assert rkd_angle(s, t).item() == pytest.approx(proper * (n - 1) * (n - 2) / n**2, rel=1e-10)

    # lenscloth/RKD's pdist / RkdDistance / RKdAngle, written out with torch ops for this check.
    def pdist(e):
        sq = e.pow(2).sum(1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def official_distance(a, b):
        d_a, d_b = pdist(a), pdist(b)
        return torch.nn.functional.smooth_l1_loss(d_a / d_a[d_a > 0].mean(), d_b / d_b[d_b > 0].mean())

    def official_angle(a, b):
        def angles(e):
            u = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
            return torch.bmm(u, u.transpose(1, 2)).view(-1)

        return torch.nn.functional.smooth_l1_loss(angles(a), angles(b))

    assert rkd_distance(s, t).item() == pytest.approx(official_distance(s, t).item(), rel=1e-10)
    assert rkd_angle(s, t).item() == pytest.approx(official_angle(s, t).item(), rel=1e-10)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_gradcheck_on_both_sides(name):
    g = _seed("grad", name)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda a, b: FUNCTIONS[name](a, b, mask=mask), (s, t))
    if name == "linear_cka_loss":  # and the Gram path
        s2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
        t2 = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(linear_cka_loss, (s2, t2))


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


def _pair(key, n=8, d_s=5, d_t=7):
    g = _seed(key)
    return (
        torch.randn(n, d_s, generator=g, dtype=torch.float64),
        torch.randn(n, d_t, generator=g, dtype=torch.float64),
        g,
    )


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "linear_cka_loss"])
def test_invariant_to_scaling_translating_and_rotating_either_side(name):
    fn = FUNCTIONS[name]
    s, t, g = _pair(("invariance", name))
    base = fn(s, t).item()
    q_s, q_t = _orthogonal(s.shape[1], g), _orthogonal(t.shape[1], g)
    shift_s, shift_t = torch.randn(s.shape[1], generator=g, dtype=torch.float64) * 5, 3.0
    for a, b in [
        (7.0 * s, t),
        (s, 0.01 * t),
        (s + shift_s, t - shift_t),
        (s @ q_s, t),
        (s, t @ q_t),
        (2.5 * s @ q_s + shift_s, 0.3 * t @ q_t + shift_t),
    ]:
        assert fn(a, b).item() == pytest.approx(base, rel=1e-10)
    assert base > 0


@pytest.mark.parametrize("name", FUNCTIONS)
def test_zero_when_the_teacher_is_a_scaled_copy(name):
    s, _, g = _pair(("copy", name))
    assert abs(FUNCTIONS[name](s, s.clone()).item()) < 1e-12
    assert abs(FUNCTIONS[name](s, 4.0 * s).item()) < 1e-12
    assert abs(FUNCTIONS[name](0.2 * s, s).item()) < 1e-12
    if name != "similarity_preserving":  # a Gram matrix is not translation-free
        q = _orthogonal(s.shape[1], g)
        assert abs(FUNCTIONS[name](s, 3.0 * s @ q - 1.0).item()) < 1e-12


def test_similarity_preserving_is_invariant_to_scaling_either_side():
    s, t, g = _pair("sp-scale")
    base = similarity_preserving(s, t).item()
    for a, b in [(9.0 * s, t), (s, 0.05 * t), (3.0 * s, 20.0 * t)]:
        assert similarity_preserving(a, b).item() == pytest.approx(base, rel=1e-12)
    q = _orthogonal(s.shape[1], g)  # a rotation of the features keeps f f^T
    assert similarity_preserving(s @ q, t).item() == pytest.approx(base, rel=1e-10)
    assert base > 0


def test_cka_compares_different_widths_through_an_isometry():
    """X Q with Q [D_s, D_t] orthonormal rows keeps X X^T: CKA 1 across widths."""
    s, _, g = _pair("cka-width", n=6, d_s=3)
    q = _orthogonal(8, g)[:3]  # (3, 8), Q Q^T = I
    assert abs(linear_cka_loss(s, s @ q).item()) < 1e-12
    assert abs(linear_cka_loss(s @ q, s).item()) < 1e-12


PROFILE = settings(max_examples=40, deadline=None)


@PROFILE
@given(
    st.integers(2, 6),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
    st.floats(0.01, 100.0),
)
def test_cka_loss_lies_in_the_unit_interval(n, d_s, d_t, seed, scale):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d_s, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    value = linear_cka_loss(s, t).item()
    assert -1e-12 <= value <= 1.0 + 1e-12
    assert linear_cka_loss(t, s).item() == pytest.approx(value, rel=1e-9, abs=1e-12)  # symmetric


# ---------------------------------------------------------------------------------------------
# Masks, too few rows, dtypes, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_masked_rows_change_nothing(name):
    s, t, _ = _pair(("padding", name))
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = float("nan"), float("inf")
    assert torch.equal(FUNCTIONS[name](s, t, mask=mask), FUNCTIONS[name](s2, t2, mask=mask))
    assert FUNCTIONS[name](s, t, mask=mask).item() == pytest.approx(
        FUNCTIONS[name](s[mask], t[mask]).item(), rel=1e-12
    )
    x = s2.clone().requires_grad_()
    FUNCTIONS[name](x, t2, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and not x.grad[~mask].any()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_too_few_rows_give_zero_with_a_zero_gradient(name):
    fn = FUNCTIONS[name]
    for kept in range(MIN_ROWS[name]):
        s = torch.randn(4, 3, requires_grad=True)
        t = torch.randn(4, 5, requires_grad=True)
        mask = torch.arange(4) < kept
        out = fn(s, t, mask=mask)
        out.backward()
        assert out.item() == 0.0 and not s.grad.any() and not t.grad.any()
        s_few, t_few = torch.randn(kept, 3, requires_grad=True), torch.randn(kept, 5)
        few = fn(s_few, t_few)
        few.backward()
        assert few.item() == 0.0 and s_few.grad is not None and not s_few.grad.any()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_dtypes_and_coincident_points(name):
    fn = FUNCTIONS[name]
    s, t = torch.randn(5, 3, dtype=torch.float16), torch.randn(5, 4, dtype=torch.bfloat16)
    assert fn(s, t).dtype == torch.float32
    assert fn(s.double(), t.double()).dtype == torch.float64
    # Duplicated rows (zero distances off the diagonal): finite values and gradients.
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], requires_grad=True)
    out = fn(x, torch.randn(4, 3))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_cka_of_a_constant_side_is_one_not_nan():
    x = torch.ones(5, 3, requires_grad=True)
    out = linear_cka_loss(x, torch.randn(5, 2))
    out.backward()
    assert out.item() == pytest.approx(1.0) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_errors_name_the_shapes(name):
    fn = FUNCTIONS[name]
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\).*same N"):
        fn(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(5,\); expected \[N\] = \(4,\)"):
        fn(torch.zeros(4, 3), torch.zeros(4, 2), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"\[B, \.\.\.\]" if name == "similarity_preserving" else r"\[N, D\]"
    ):
        fn(torch.zeros(4), torch.zeros(4))
    if name != "similarity_preserving":
        with pytest.raises(ValueError, match=r"\[N, D\].*\(4, 3, 2\).*flatten"):
            fn(torch.zeros(4, 3, 2), torch.zeros(4, 3))
    else:
        with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\).*\(5, 7\).*same N"):
            fn(torch.zeros(4, 3, 2, 2), torch.zeros(5, 7))


# ---------------------------------------------------------------------------------------------
# Naive references (float64 Python loops, no vectorised torch maths)
# ---------------------------------------------------------------------------------------------


def smooth_l1(x, beta=1.0):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def euclidean(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def normalised_distances(rows):
    n = len(rows)
    d = [[0.0 if i == j else euclidean(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[v / mean for v in row] for row in d]


def naive_rkd_distance(s, t, include_diagonal=True):
    """Park et al.'s distance loss, averaged over all N^2 pairs (official code) or the off-diagonal ones."""
    n = len(s)
    d_s, d_t = normalised_distances(s), normalised_distances(t)
    pairs = [(i, j) for i in range(n) for j in range(n) if include_diagonal or i != j]
    return sum(smooth_l1(d_s[i][j] - d_t[i][j]) for i, j in pairs) / len(pairs)


def cosine_at(rows, i, j, k):
    """cos of the angle at rows[j] between rows[i] and rows[k]; 0 if either leg is empty."""
    u = [a - b for a, b in zip(rows[i], rows[j])]
    v = [a - b for a, b in zip(rows[k], rows[j])]
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    if nu == 0 or nv == 0:
        return 0.0
    return sum(x * y for x, y in zip(u, v)) / (nu * nv)


def naive_rkd_angle(s, t, proper_triples_only=False):
    """Park et al.'s angle loss, averaged over all N^3 triples (official code) or the proper ones."""
    n = len(s)
    total, count = 0.0, 0
    for j in range(n):
        for i in range(n):
            for k in range(n):
                if proper_triples_only and len({i, j, k}) < 3:
                    continue
                total += smooth_l1(cosine_at(s, i, j, k) - cosine_at(t, i, j, k))
                count += 1
    return total / count


def normalised_gram(rows):
    n = len(rows)
    gram = [[sum(a * b for a, b in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]
    out = []
    for row in gram:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        out.append([v / norm for v in row])
    return out


def naive_similarity_preserving(s, t):
    """Tung & Mori: ||G~_s - G~_t||_F^2 / B^2 with row-normalised Gram matrices."""
    n = len(s)
    g_s, g_t = normalised_gram(s), normalised_gram(t)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def centred_columns(rows):
    n, d = len(rows), len(rows[0])
    means = [sum(rows[i][c] for i in range(n)) / n for c in range(d)]
    return [[rows[i][c] - means[c] for c in range(d)] for i in range(n)]


def cross_frobenius_squared(a, b):
    """||A^T B||_F^2 for A [N, P], B [N, Q], entry by entry."""
    n, p, q = len(a), len(a[0]), len(b[0])
    total = 0.0
    for u in range(p):
        for v in range(q):
            entry = sum(a[i][u] * b[i][v] for i in range(n))
            total += entry * entry
    return total


def naive_linear_cka_loss(s, t):
    """1 - ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with centred columns (Kornblith et al.)."""
    x, y = centred_columns(s), centred_columns(t)
    cka = cross_frobenius_squared(y, x) / (
        math.sqrt(cross_frobenius_squared(x, x)) * math.sqrt(cross_frobenius_squared(y, y))
    )
    return 1.0 - cka
