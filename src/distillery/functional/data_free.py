"""Data-free distillation: the losses that synthesise inputs from a teacher alone (DeepInversion).

From "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (Yin et al., CVPR 2020):
a batch of inputs ``x`` is optimised so that the teacher classifies it as chosen targets while the
statistics of its batch-norm inputs match the running statistics stored in those layers, under image
priors. The paper's objective is

    min_x  CE(f(x), y) + a_tv R_tv(x) + a_l2 R_l2(x) + a_f R_feature(x),

    R_feature(x) = sum_l || mu_l(x) - running_mean_l ||_2 + || sigma^2_l(x) - running_var_l ||_2.

As in the official code, ``R_tv`` is the sum of the Euclidean norms of the four one-pixel differences
(horizontal, vertical, both diagonals), ``R_l2`` is the Euclidean norm of ``x`` (not its square), the
batch statistics are those of each batch-norm layer's *input* with the biased variance, and the norms
are not squared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision inputs; float64 stays float64 (references, gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def batch_norm_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a batch-norm layer's input.

    Args:
        x: ``[B, C]`` or ``[B, C, *spatial]``.

    Returns:
        ``([C], [C])``: the mean and the variance over the batch and every spatial position.

    Example:
        >>> m, v = batch_norm_statistics(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.tolist(), v.tolist()
        ([2.0, 4.0], [1.0, 4.0])
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    return mean, var


def bn_feature_loss(
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    running_means: Sequence[Tensor],
    running_vars: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """DeepInversion's feature regulariser: how far the batch's statistics are from the stored ones.

        R_feature = sum_l w_l (|| mu_l - running_mean_l ||_2 + || var_l - running_var_l ||_2)

    Args:
        means, variances: per layer ``l``, ``[C_l]``, the batch's statistics
            (:func:`batch_norm_statistics`).
        running_means, running_vars: per layer, ``[C_l]``, what the layer stored in training.
        weights: per layer (default 1; the official ImageNet code weights the first layer 10x).

    Returns:
        a scalar (float32; float64 for float64 inputs).

    Example:
        >>> bn_feature_loss([torch.tensor([3.0, 4.0])], [torch.tensor([1.0, 1.0])],
        ...                 [torch.zeros(2)], [torch.ones(2)])
        tensor(5.)
    """
    if not (len(means) == len(variances) == len(running_means) == len(running_vars)):
        raise ValueError("means, variances, running_means and running_vars need one entry per layer")
    weights = [1.0] * len(means) if weights is None else list(weights)
    if not means:
        return torch.zeros(())
    total = torch.zeros((), dtype=_wide(means[0]).dtype, device=means[0].device)
    for w, m, v, rm, rv in zip(weights, means, variances, running_means, running_vars):
        m, v = _wide(m), _wide(v)
        total = total + w * (
            torch.linalg.vector_norm(m - rm.to(m.dtype)) + torch.linalg.vector_norm(v - rv.to(v.dtype))
        )
    return total


def image_total_variation(x: Tensor) -> Tensor:
    """DeepInversion's total-variation prior: the Euclidean norms of the differences between each pixel
    and its right, lower, lower-left and lower-right neighbours, summed.

        R_tv = ||x[.., :, :-1] - x[.., :, 1:]||_2 + ||x[.., :-1, :] - x[.., 1:, :]||_2
             + ||x[.., 1:, :-1] - x[.., :-1, 1:]||_2 + ||x[.., :-1, :-1] - x[.., 1:, 1:]||_2

    Args:
        x: ``[B, C, H, W]``.

    Example:
        >>> image_total_variation(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
        tensor(3.4142)
    """
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return sum(torch.linalg.vector_norm(_wide(d)) for d in (d1, d2, d3, d4))


def image_l2(x: Tensor) -> Tensor:
    """DeepInversion's l2 prior ``R_l2 = ||x||_2`` (over the whole batch, as the official code).

    Example:
        >>> image_l2(torch.tensor([[3.0, 4.0]]))
        tensor(5.)
    """
    return torch.linalg.vector_norm(_wide(x))


__all__ = ["batch_norm_statistics", "bn_feature_loss", "image_l2", "image_total_variation"]
