"""Metrics for generated samples: the Fréchet distance of feature statistics and class coverage.

Both take what a fixed network already produced (no model runs here): :func:`frechet_distance` compares
feature vectors of real and generated images (an Inception-v3 pool layer gives FID; any encoder gives the
same statistic in its own feature space), :func:`confident_coverage` reads a classifier's probabilities
for generated samples and says how confidently they are classified and how evenly they cover the classes.
Inputs may be torch tensors (any device or dtype) or NumPy arrays; the arithmetic is float64 NumPy/SciPy.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.linalg import LinAlgWarning, sqrtm

# An imaginary part of sqrtm's result up to this fraction of its largest entry is rounding, and dropped.
IMAGINARY_TOLERANCE = 1.0e-3


def _float64_matrix(x: Any, name: str, shape: str = "[N, D]") -> np.ndarray:
    """A torch tensor or array-like ``[N, D]`` as a float64 NumPy array, checked."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a {shape} matrix (one row per sample); got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def _sqrtm_or_none(m: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root of ``m``, or None where scipy finds ``m`` singular (or returns inf/NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)  # "Matrix is singular": treat as singular
        try:
            root = sqrtm(m)
        except (LinAlgWarning, np.linalg.LinAlgError):
            return None
    return root if np.isfinite(root).all() else None


def frechet_distance(features_a: Any, features_b: Any, *, eps: float = 1.0e-6) -> float:
    """The Fréchet (2-Wasserstein) distance between Gaussians fitted to two sets of feature vectors.

        FD = ||mu_a - mu_b||_2^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    with the sample means ``mu`` and the unbiased sample covariances ``S`` (divided by ``N - 1``). From
    "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (Heusel et al.,
    NeurIPS 2017), where it is FID on Inception-v3 pool features.

    Numerics (float64 throughout): ``(S_a S_b)^(1/2)`` is ``scipy.linalg.sqrtm`` of the product. Its result
    may carry a tiny imaginary part from rounding; it is discarded when its largest magnitude is at most
    1e-3 of the largest entry's, and a ValueError is raised otherwise. Only when scipy finds the product
    singular (its ``LinAlgWarning``, or a non-finite root, e.g. both sets constant along a direction),
    ``eps * I`` is added to *both* covariances and the whole formula is evaluated with them: the distance
    between the slightly widened Gaussians. (pytorch-fid adds the offset inside the square root only.)
    A distance that rounds below 0 is returned as 0.

    Args:
        features_a: ``[N_a, D]`` one feature vector per sample (torch tensor or NumPy array), ``N_a >= 2``.
        features_b: ``[N_b, D]`` the other set, the same ``D``; ``N_a`` and ``N_b`` may differ.
        eps: the diagonal offset used for a singular product, > 0.

    Returns:
        the distance, a Python float ``>= 0`` (in squared feature units).

    Example:
        >>> a = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # mean (1, 1), S = 4/3 I
        >>> round(frechet_distance(a, a + 3.0), 6)  # the same covariance, the means 3 * sqrt(2) apart
        18.0
        >>> round(frechet_distance(a, 2.0 * a), 6)  # Tr(4/3 I + 16/3 I - 2 * 8/3 I) + ||(1, 1)||^2
        4.666667
    """
    a = _float64_matrix(features_a, "features_a")
    b = _float64_matrix(features_b, "features_b")
    for name, x in (("features_a", a), ("features_b", b)):
        if x.shape[0] < 2:
            raise ValueError(
                f"{name} has {x.shape[0]} row(s); a covariance needs at least 2 samples (and a useful "
                "estimate many more than the feature dimension)"
            )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a has {a.shape[1]} features per sample but features_b has {b.shape[1]}; "
            "both sets must come from the same feature extractor and layer"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False, ddof=1))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False, ddof=1))
    root = _sqrtm_or_none(cov_a @ cov_b)
    if root is None:
        offset = eps * np.eye(cov_a.shape[0])
        cov_a, cov_b = cov_a + offset, cov_b + offset
        root = _sqrtm_or_none(cov_a @ cov_b)
        if root is None:
            raise ValueError(
                f"the covariance product stays singular after adding {eps} * I to both covariances; "
                "pass a larger eps or more samples"
            )
    if np.iscomplexobj(root):
        imaginary = float(np.abs(root.imag).max())
        scale = float(np.abs(root).max())
        if imaginary > IMAGINARY_TOLERANCE * scale:
            raise ValueError(
                f"the matrix square root of the covariance product has an imaginary part of {imaginary:.3g} "
                f"(its largest entry is {scale:.3g}): the covariance estimates are unreliable (too few "
                "samples for the feature dimension, or non-finite features)"
            )
        root = root.real
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
    return max(value, 0.0)


def confident_coverage(probabilities: Any, threshold: float = 0.9) -> dict[str, Any]:
    """How confidently a classifier labels generated samples, and how evenly the labels cover the classes.

        confident      = (1/N) #{n : max_k p_nk > threshold}
        h_k            = (1/N) #{n : argmax_j p_nj = k}
        tv_to_uniform  = 0.5 * sum_k |h_k - 1/K|
        classes_covered = #{k : h_k > 0}

    The two properties the Inception Score of "Improved Techniques for Training GANs" (Salimans et al.,
    NeurIPS 2016) rewards, confident per-sample predictions and a spread-out class marginal, read off
    directly: a collapsed generator has ``tv_to_uniform`` near ``1 - 1/K`` and few ``classes_covered``; one
    that produces unrecognisable samples has a low ``confident``. Ties in the top probability go to the
    lower class index.

    Args:
        probabilities: ``[N, K]`` class probabilities for ``N >= 1`` samples (each row sums to 1 within 1e-2;
            softmax the logits first), torch tensor or NumPy array.
        threshold: the top probability a sample must *exceed* to count as confident, in ``[0, 1]``.

    Returns:
        ``{"confident": float, "histogram": list[float] of length K, "tv_to_uniform": float,
        "classes_covered": int}``.

    Example:
        >>> p = np.array([[0.95, 0.05, 0.0], [0.6, 0.3, 0.1], [0.02, 0.97, 0.01], [0.1, 0.1, 0.8]])
        >>> out = confident_coverage(p)  # predicted classes 0, 0, 1, 2; two rows above 0.9
        >>> out["confident"], out["histogram"], round(out["tv_to_uniform"], 4), out["classes_covered"]
        (0.5, [0.5, 0.25, 0.25], 0.1667, 3)
    """
    p = _float64_matrix(probabilities, "probabilities", "[N, K]")
    n, k = p.shape
    if n < 1 or k < 1:
        raise ValueError(f"probabilities must have at least one sample and one class; got shape {p.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    if (p < 0).any() or (p > 1).any() or not np.allclose(p.sum(1), 1.0, rtol=0.0, atol=1e-2):
        raise ValueError(
            "probabilities must be in [0, 1] with rows summing to 1; pass softmax(logits), not logits"
        )
    top = p.max(1)
    predicted = p.argmax(1)
    histogram = np.bincount(predicted, minlength=k) / n
    return {
        "confident": float((top > threshold).mean()),
        "histogram": [float(h) for h in histogram],
        "tv_to_uniform": float(0.5 * np.abs(histogram - 1.0 / k).sum()),
        "classes_covered": int((histogram > 0).sum()),
    }


__all__ = ["confident_coverage", "frechet_distance"]
