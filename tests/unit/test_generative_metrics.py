"""Fréchet distance and class coverage of generated samples.

The Fréchet distance is checked against a separate float64 NumPy computation that uses the symmetric form
Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) through eigendecompositions (no sqrtm), and against closed forms on
data built so that its empirical mean and covariance are exactly the chosen ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distillery.eval.generative as generative
from distillery.eval.generative import confident_coverage, frechet_distance

# ---------------------------------------------------------------- references


def psd_sqrt(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix, by eigh (negative rounding clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_fd(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2), all by eigh."""
    root_a = psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    w = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    diff = np.asarray(mu_a) - np.asarray(mu_b)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(np.clip(w, 0.0, None)).sum())


def empirical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance written out (not np.cov)."""
    mu = x.sum(0) / x.shape[0]
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    return gaussian_fd(*empirical(a), *empirical(b))


def with_moments(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """``n`` points whose empirical mean is ``mu`` and unbiased covariance is ``cov``, up to rounding."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    c = z.T @ z / (n - 1)
    whitened = np.linalg.solve(np.linalg.cholesky(c), z.T).T  # empirical covariance exactly I
    return whitened @ np.linalg.cholesky(cov).T + mu


def random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize(
    ("n_a", "n_b", "d", "seed"), [(200, 300, 3, 0), (500, 250, 8, 1), (400, 400, 16, 2), (300, 500, 5, 3)]
)
def test_frechet_distance_matches_the_symmetric_eigh_form(n_a, n_b, d, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_a, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    b = rng.standard_normal((n_b, d)) @ rng.standard_normal((d, d)) + 0.5 * rng.standard_normal(d)
    want = reference_fd(a, b)
    assert want > 0.1
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9, abs=1e-10)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-9, abs=1e-10)  # symmetric
    # torch tensors (any dtype) are read as float64 NumPy
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    want32 = reference_fd(ta.double().numpy(), tb.double().numpy())
    assert frechet_distance(ta, tb) == pytest.approx(want32, rel=1e-9, abs=1e-10)
    assert frechet_distance(ta, b) == pytest.approx(reference_fd(ta.double().numpy(), b), rel=1e-9)


@pytest.mark.parametrize(("n", "d"), [(200, 3), (300, 16), (5, 10)])
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    x = np.random.default_rng(n + d).standard_normal((n, d))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(x), x.copy()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = with_moments(400, mu_a, np.diag(var_a), seed=0)
    b = with_moments(300, mu_b, np.diag(var_b), seed=1)
    # the data really has these moments
    np.testing.assert_allclose(empirical(a)[0], mu_a, atol=1e-12)
    np.testing.assert_allclose(empirical(a)[1], np.diag(var_a), atol=1e-12)
    # commuting covariances: sum_k (sqrt(var_a) - sqrt(var_b))^2 = 4 + 1 + 0 + (sqrt 2 - sqrt .5)^2 = 5.5
    want = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    assert want == pytest.approx(6.0 + 5.5)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_closed_forms_for_full_covariances():
    rng = np.random.default_rng(4)
    d = 6
    cov = random_cov(d, rng)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a = with_moments(250, mu_a, cov, seed=5)
    # S_b = 4 S_a commutes with S_a: the trace term is Tr(S_a) (1 - 2)^2
    b = with_moments(350, mu_b, 4.0 * cov, seed=6)
    want = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-10)
    # the same Gaussian sampled twice (different points, the same moments): exactly 0
    assert frechet_distance(a, with_moments(300, mu_a, cov, seed=7)) == pytest.approx(0.0, abs=1e-9)
    # two unrelated full covariances: the population formula for the chosen moments
    cov_b = random_cov(d, rng)
    c = with_moments(320, mu_b, cov_b, seed=8)
    assert frechet_distance(a, c) == pytest.approx(gaussian_fd(mu_a, cov, mu_b, cov_b), rel=1e-10)
    # one dimension: (mu_a - mu_b)^2 + (sd_a - sd_b)^2
    x = with_moments(50, np.array([1.0]), np.array([[4.0]]), seed=9)
    y = with_moments(80, np.array([-1.0]), np.array([[0.25]]), seed=10)
    assert frechet_distance(x, y) == pytest.approx(4.0 + 1.5**2, rel=1e-10)


def test_frechet_distance_of_sampled_gaussians_is_near_the_population_value():
    # Loose by nature: 20000 samples per set in 4 dims; the estimation error is of order 1e-2, checked at 0.1.
    rng = np.random.default_rng(12)
    a = rng.normal([0.0, 0.0, 1.0, 0.0], [1.0, 2.0, 0.5, 1.0], size=(20000, 4))
    b = rng.normal([1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 3.0], size=(20000, 4))
    population = 2.0 + (2.0 - 1.0) ** 2 + (1.0 - 3.0) ** 2
    assert frechet_distance(a, b) == pytest.approx(population, abs=0.1)


def test_frechet_distance_offsets_the_covariances_only_when_the_product_is_singular(monkeypatch):
    calls = []
    real_sqrtm = generative.sqrtm

    def counting(m):
        calls.append(m.copy())
        return real_sqrtm(m)

    monkeypatch.setattr(generative, "sqrtm", counting)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 4)), rng.standard_normal((300, 4)) + 1.0
    frechet_distance(a, b)
    assert len(calls) == 1  # a regular product: no offset
    calls.clear()
    # constant sets: both covariances are 0, scipy reports the product singular, eps * I is added to both
    # covariances, and the offsets cancel in the distance: only ||mu_a - mu_b||^2 = 3 * 2^2 remains
    assert frechet_distance(np.ones((10, 3)), np.full((20, 3), 3.0)) == pytest.approx(12.0, abs=1e-9)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], 1e-12 * np.eye(3), rtol=1e-12)


def test_frechet_distance_imaginary_parts(monkeypatch):
    real_sqrtm = generative.sqrtm
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, 3)), rng.standard_normal((200, 3))
    want = reference_fd(a, b)
    monkeypatch.setattr(generative, "sqrtm", lambda m: real_sqrtm(m) + 1e-9j)  # rounding noise: dropped
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    monkeypatch.setattr(generative, "sqrtm", lambda m: real_sqrtm(m) + 0.5j)  # not rounding: refused
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(a, b)


def test_frechet_distance_refuses_bad_input():
    x = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="4 features per sample but features_b has 3"):
        frechet_distance(x, x[:, :3])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(x[:, 0], x[:, 0])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(bad, x)
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(x, x, eps=0.0)


# ---------------------------------------------------------------- confident_coverage


def test_confident_coverage_by_hand():
    p = np.array(
        [
            [0.95, 0.05, 0.0, 0.0],
            [0.6, 0.3, 0.1, 0.0],
            [0.02, 0.97, 0.01, 0.0],
            [0.9, 0.1, 0.0, 0.0],  # exactly at the threshold: not confident (strictly above is required)
            [0.1, 0.1, 0.8, 0.0],
        ]
    )
    out = confident_coverage(p)
    assert set(out) == {"confident", "histogram", "tv_to_uniform", "classes_covered"}
    assert out["confident"] == pytest.approx(2 / 5)
    assert out["histogram"] == pytest.approx([3 / 5, 1 / 5, 1 / 5, 0.0])
    # 0.5 * (|0.6 - 0.25| + 2 |0.2 - 0.25| + |0 - 0.25|) = 0.35
    assert out["tv_to_uniform"] == pytest.approx(0.35)
    assert out["classes_covered"] == 3
    assert confident_coverage(p, threshold=0.5)["confident"] == pytest.approx(1.0)
    assert confident_coverage(torch.from_numpy(p).half(), threshold=0.5)["histogram"] == pytest.approx(
        [3 / 5, 1 / 5, 1 / 5, 0.0]
    )


def test_confident_coverage_collapse_uniformity_and_ties():
    k = 5
    collapsed = np.tile(np.eye(k)[2], (7, 1))
    out = confident_coverage(collapsed)
    assert out == {
        "confident": 1.0,
        "histogram": [0.0, 0.0, 1.0, 0.0, 0.0],
        "tv_to_uniform": pytest.approx(1 - 1 / k),
        "classes_covered": 1,
    }
    spread = np.repeat(np.eye(k), 3, axis=0)
    out = confident_coverage(torch.from_numpy(spread))
    assert out["histogram"] == pytest.approx([1 / k] * k) and out["tv_to_uniform"] == pytest.approx(0.0)
    assert out["classes_covered"] == k
    tied = np.array([[0.5, 0.5], [0.5, 0.5]])  # ties go to the lower index
    assert confident_coverage(tied)["histogram"] == [1.0, 0.0]
    assert confident_coverage(tied)["confident"] == 0.0


def test_confident_coverage_refuses_bad_input():
    with pytest.raises(ValueError, match="softmax"):
        confident_coverage(np.array([[2.0, -1.0], [0.5, 0.1]]))  # logits
    with pytest.raises(ValueError, match="softmax"):
        confident_coverage(np.array([[0.3, 0.3], [0.5, 0.5]]))  # a row summing to 0.6
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        confident_coverage(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="at least one sample"):
        confident_coverage(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="threshold"):
        confident_coverage(np.array([[1.0, 0.0]]), threshold=1.5)
