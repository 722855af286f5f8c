"""Divergences between the teacher's and the student's class (or token) distributions."""

from __future__ import annotations

from torch import Tensor

from distillery.functional._rows import (
    align_vocab,
    check_reduction,
    check_temperature,
    flatten_rows,
    kl_rows,
    log_probs,
    reduce_rows,
)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Forward KL divergence from the teacher to the student, scaled by :math:`T^2`.

    .. math::

        \mathcal{L} = T^2 \, \mathrm{KL}(p_t \,\|\, p_s)
                    = T^2 \sum_c p_t(c) \left(\log p_t(c) - \log p_s(c)\right),
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    The :math:`T^2` factor keeps the gradient scale roughly independent of the temperature (Hinton
    et al., "Distilling the Knowledge in a Neural Network"). Forward KL is mass-covering: the student
    is pushed to put probability wherever the teacher does.

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape), no gradient needed.
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this count instead (the global number of valid
            rows across gradient-accumulation steps and data-parallel ranks).
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> forward_kl(s, t)
        tensor(0.2995)
        >>> forward_kl(s, t, temperature=4.0, reduction="none")
        tensor([0.3682, 0.4968])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    per_row = kl_rows(log_probs(t, temperature), log_probs(s, temperature)) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)
