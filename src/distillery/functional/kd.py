"""Distillation objectives that combine a divergence with the hard labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    *,
    teacher_temperature: float | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Hinton's knowledge-distillation loss: softened forward KL mixed with hard-label cross-entropy.

    Per row :math:`i`:

    .. math::

        \ell_i = \alpha \, T_s^2 \, \mathrm{KL}\!\left(\mathrm{softmax}(t_i / T_t) \,\|\,
                 \mathrm{softmax}(s_i / T_s)\right)
                 + (1 - \alpha)\, \mathrm{CE}(s_i, y_i)

    from "Distilling the Knowledge in a Neural Network" (Hinton, Vinyals, Dean). The CE term is 0 on
    rows without a label (``target == ignore_index``, e.g. an unlabelled transfer set) and everywhere
    when ``target`` is None. Separate teacher and student temperatures follow "LTD: Low Temperature
    Distillation for Robust Adversarial Training"; by default :math:`T_t = T_s = T`. ``alpha`` is not
    clamped: values above 1 (a negative weight on the labels) are the self-distillation regime that
    "Understanding Self-Distillation in the Presence of Label Noise" finds best under heavy label
    noise.

    Args:
        student_logits: ``[..., C]`` student logits.
        teacher_logits: ``[..., C]`` teacher logits.
        target: optional ``[...]`` class indices, ``ignore_index`` where a row has no label.
        temperature: student temperature :math:`T_s` (and the teacher's unless given).
        alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy.
        teacher_temperature: :math:`T_t`, if different from :math:`T_s`.
        mask: optional ``[...]`` boolean; False rows are ignored entirely.
        reduction: ``"mean"`` over valid rows, ``"sum"`` or ``"none"``.
        num_valid: global normaliser for ``"mean"``.
        ignore_index: target value of unlabelled rows.
        vocab_size: compare only the first ``vocab_size`` classes.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> kd_loss(s, t, torch.tensor([0, -100]), temperature=4.0, alpha=0.9)
        tensor(0.4013)
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    check_temperature("teacher_temperature", t_teacher)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, y, index, lead = flatten_rows(student_logits, teacher_logits, mask, target=target)
    per_row = alpha * temperature**2 * kl_rows(log_probs(t, t_teacher), log_probs(s, temperature))
    if y is not None and alpha != 1.0:
        labelled = y != ignore_index
        safe_y = torch.where(labelled, y, torch.zeros_like(y)).long()
        ce = F.cross_entropy(s, safe_y, reduction="none")
        per_row = per_row + (1.0 - alpha) * torch.where(labelled, ce, torch.zeros_like(ce))
    return reduce_rows(per_row, index, lead, reduction, num_valid)
