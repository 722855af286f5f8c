"""Maths of compression-aware distillation: the gradual pruning schedule and magnitude masks.

Pure functions; the pruned and quantized modules that use them are in ``distillery.models.compression``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sparsity_at(step: int, total_steps: int, final: float, start: float = 0.1, end: float = 0.7) -> float:
    """The target sparsity at optimizer step ``step`` (0-based) of gradual magnitude pruning.

    From "To prune, or not to prune: exploring the efficacy of pruning for model compression" (Zhu &
    Gupta, 2017), eq. 1, with initial sparsity 0: between ``t0 = start * T`` and ``t1 = end * T``

        s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3),

    0 before ``t0`` and ``s_f`` from ``t1`` on: the network is pruned fast while it is redundant and
    slowly as it nears the final sparsity. Here ``t`` is continuous (the paper prunes every ``Δt`` steps;
    the caller picks the steps at which masks are recomputed).

    Args:
        step: the step about to run, ``0 <= step``.
        total_steps: ``T``, the run's number of steps.
        final: ``s_f`` in ``[0, 1)``.
        start, end: ``t0 / T`` and ``t1 / T``, ``0 <= start < end <= 1``.

    Example:
        >>> round(sparsity_at(40, 100, 0.8, start=0.1, end=0.7), 4)
        0.7
        >>> sparsity_at(5, 100, 0.8), sparsity_at(70, 100, 0.8)
        (0.0, 0.8)
    """
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"need 0 <= start < end <= 1, got start={start}, end={end}")
    t0, t1 = start * total_steps, end * total_steps
    if step <= t0:
        return 0.0
    if step >= t1:
        return float(final)
    return float(final * (1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3))


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Keep the largest-magnitude entries of ``weight``: a mask with ``floor(sparsity * n)`` zeros.

    The zeros go to the smallest ``|w|``; ties are broken by position (the earlier entry is pruned
    first), so the mask is a function of the values alone. Weights already zero are pruned first, so a
    rising schedule never revives a pruned weight.

    Args:
        weight: any shape, ``n`` entries.
        sparsity: the fraction to prune, in ``[0, 1)``.

    Returns:
        ``weight``'s shape and dtype, 1 where kept and 0 where pruned.

    Example:
        >>> magnitude_mask(torch.tensor([[0.5, -2.0], [0.1, 1.0]]), 0.5)
        tensor([[0., 1.],
                [0., 1.]])
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = weight.detach().reshape(-1).abs()
    k = math.floor(sparsity * flat.numel())
    mask = torch.ones_like(flat)
    if k:
        order = torch.sort(flat, stable=True).indices  # ascending; equal values keep their order
        mask[order[:k]] = 0.0
    return mask.reshape(weight.shape).to(weight.dtype)


__all__ = ["magnitude_mask", "sparsity_at"]
