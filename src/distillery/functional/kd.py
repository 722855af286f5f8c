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


def _kd_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    temperature: float,
    alpha: float,
    teacher_temperature: float | None,
    mask: Tensor | None,
    ignore_index: int,
    vocab_size: int | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, torch.Size]:
    """The valid rows' ``alpha T^2 KL`` ``[N]``, ``(1 - alpha) CE`` ``[N]`` (0 where unlabelled; None
    without a label part), the labelled flags ``[N]`` (None likewise), the kept rows' positions and
    the leading shape."""
    check_temperature("temperature", temperature)
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    check_temperature("teacher_temperature", t_teacher)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, y, index, lead = flatten_rows(student_logits, teacher_logits, mask, target=target)
    distill = alpha * temperature**2 * kl_rows(log_probs(t, t_teacher), log_probs(s, temperature))
    if y is None or alpha == 1.0:
        return distill, None, None, index, lead
    labelled = y != ignore_index  # (N,)
    safe_y = torch.where(labelled, y, torch.zeros_like(y)).long()
    ce = F.cross_entropy(s, safe_y, reduction="none")
    label = (1.0 - alpha) * torch.where(labelled, ce, torch.zeros_like(ce))
    return distill, label, labelled, index, lead


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
    num_labelled: Tensor | float | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Hinton's knowledge-distillation loss: softened forward KL mixed with hard-label cross-entropy.

    Over the valid rows :math:`V` (``mask``) and the labelled valid rows :math:`L \subseteq V`
    (``target != ignore_index``), ``"mean"`` is

    .. math::

        \mathcal{L} = \frac{\alpha \, T_s^2}{|V|} \sum_{i \in V} \mathrm{KL}\!\left(
                      \mathrm{softmax}(t_i / T_t) \,\|\, \mathrm{softmax}(s_i / T_s)\right)
                      + \frac{1 - \alpha}{|L|} \sum_{i \in L} \mathrm{CE}(s_i, y_i)

    from "Distilling the Knowledge in a Neural Network" (Hinton, Vinyals, Dean): each part is the
    mean over its own rows, so the cross-entropy part is exactly
    ``F.cross_entropy(s, y, ignore_index=-100)`` (PyTorch's convention, and that of the reference
    KD implementations), however many unlabelled transfer rows the batch carries. A masked row
    counts in neither part. The CE part is absent when ``target`` is None or ``alpha == 1``.
    Separate teacher and student temperatures follow "LTD: Low Temperature Distillation for Robust
    Adversarial Training"; by default :math:`T_t = T_s = T`. ``alpha`` is not clamped: values above
    1 (a negative weight on the labels) are the self-distillation regime that "Understanding
    Self-Distillation in the Presence of Label Noise" finds best under heavy label noise.

    ``"sum"`` and ``"none"`` give (the sum of) the per-row values
    :math:`\alpha T_s^2 \mathrm{KL}_i + (1 - \alpha)\, \mathrm{CE}_i`, with :math:`\mathrm{CE}_i = 0` on
    unlabelled rows. To divide the CE part by all valid rows instead (distillery's convention
    before it followed PyTorch's), pass ``num_labelled`` equal to the number of valid rows.

    Args:
        student_logits: ``[..., C]`` student logits.
        teacher_logits: ``[..., C]`` teacher logits.
        target: optional ``[...]`` class indices, ``ignore_index`` where a row has no label.
        temperature: student temperature :math:`T_s` (and the teacher's unless given).
        alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy.
        teacher_temperature: :math:`T_t`, if different from :math:`T_s`.
        mask: optional ``[...]`` boolean; False rows are ignored entirely.
        reduction: ``"mean"`` (each part over its own rows, above), ``"sum"`` or ``"none"``.
        num_valid: global normaliser :math:`|V|` of the KL part for ``"mean"`` (the valid rows of
            the whole step: gradient accumulation and data parallelism); default: this call's.
        num_labelled: global normaliser :math:`|L|` of the CE part for ``"mean"``; default: this
            call's labelled valid rows.
        ignore_index: target value of unlabelled rows.
        vocab_size: compare only the first ``vocab_size`` classes.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> kd_loss(s, t, torch.tensor([0, -100]), temperature=4.0, alpha=0.9)
        tensor(0.4134)
    """
    check_reduction(reduction)
    distill, label, labelled, index, lead = _kd_rows(
        student_logits,
        teacher_logits,
        target,
        temperature,
        alpha,
        teacher_temperature,
        mask,
        ignore_index,
        vocab_size,
    )
    if reduction != "mean":
        per_row = distill if label is None else distill + label
        return reduce_rows(per_row, index, lead, reduction, num_valid)
    value = reduce_rows(distill, index, lead, "mean", num_valid)
    if label is None:
        return value
    rows = labelled.nonzero().squeeze(-1)  # the CE part's rows, in order
    return value + reduce_rows(label.index_select(0, rows), None, lead, "mean", num_labelled)


def kd_loss_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    *,
    teacher_temperature: float | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The two per-row parts of :func:`kd_loss`, for callers that weight rows before averaging.

    Returns ``(distill, label)``, both ``[...]``: :math:`\alpha T_s^2 \mathrm{KL}_i` on valid rows and
    :math:`(1 - \alpha)\, \mathrm{CE}_i` on labelled valid rows, 0 elsewhere (``label`` is all 0 when
    ``target`` is None or ``alpha == 1``). :func:`kd_loss`'s ``"mean"`` is ``distill`` summed over
    the valid rows divided by their number plus ``label`` summed over the labelled valid rows divided
    by theirs. Arguments as in :func:`kd_loss`.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> distill, label = kd_loss_parts(s, t, torch.tensor([0, -100]), temperature=4.0, alpha=0.9)
        >>> distill.sum() / 2 + label.sum() / 1
        tensor(0.4134)
    """
    distill, label, _, index, lead = _kd_rows(
        student_logits,
        teacher_logits,
        target,
        temperature,
        alpha,
        teacher_temperature,
        mask,
        ignore_index,
        vocab_size,
    )
    distill = reduce_rows(distill, index, lead, "none", None)
    label = torch.zeros_like(distill) if label is None else reduce_rows(label, index, lead, "none", None)
    return distill, label
