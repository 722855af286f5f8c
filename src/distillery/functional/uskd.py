"""USKD: teacher-free self-knowledge distillation with customised soft labels."""

from __future__ import annotations

import torch
from torch import Tensor

from distillery.functional._rows import (
    LOG_FLOOR,
    check_reduction,
    check_targets,
    compute_dtype,
    cross_entropy_rows,
    flatten_rows,
    labelled_mask,
    reduce_rows,
    split_at_target,
)

# The official code's guard in the rank score's denominators.
_RANK_EPS = 1.0e-6


def zipf_non_target_labels(scores: Tensor, target: Tensor) -> Tensor:
    """``[N, C]`` Zipf soft labels over the non-target classes, ranked by ``scores`` (highest first).

    All C classes are ranked, the target included; the class ranked r-th gets weight ``1/r``, then the
    target's weight is set to 0 and the rest renormalised to sum to 1 (as the official USKD code
    does). Ties keep class order.
    """
    n, c = scores.shape
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (N, C)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=scores.device).expand(n, c))
    weights = 1.0 / (rank + 1).to(scores.dtype)  # (N, C), rank over all C classes
    weights = weights.scatter(-1, target.unsqueeze(-1), 0.0)
    return weights / weights.sum(-1, keepdim=True)


def uskd_rank_scores(source: Tensor, target: Tensor, weak_logits: Tensor | None = None) -> Tensor:
    r"""``[N, C]`` scores the official USKD code ranks the classes by (no gradient is needed).

    :math:`\log s(k) / (1 - \log s(y) + 10^{-6})` with :math:`s = \mathrm{softmax}(\text{source})`,
    plus :math:`w(k) / (1 - w(y) + 10^{-6})` with :math:`w = \mathrm{softmax}(\text{weak\_logits})`
    when a weak head is given. Logits are floored at ``LOG_FLOOR`` so that ``-inf`` slots stay finite.
    """
    log_s = torch.log_softmax(source.clamp_min(LOG_FLOOR), dim=-1)  # (N, C)
    log_s_y = log_s.gather(-1, target.unsqueeze(-1))  # (N, 1)
    scores = log_s / (1.0 - log_s_y + _RANK_EPS)
    if weak_logits is not None:
        w = torch.softmax(weak_logits.clamp_min(LOG_FLOOR), dim=-1)  # (N, C)
        scores = scores + w / (1.0 - w.gather(-1, target.unsqueeze(-1)) + _RANK_EPS)
    return scores


def uskd_loss(
    student_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
    *,
    soft_label_logits: Tensor | None = None,
    weak_logits: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""USKD: normalised target and non-target cross-entropies with soft labels made by the student.

    From "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels" (Yang et al., ICCV 2023). No teacher: the soft labels
    come from the student's own (detached) predictions :math:`s = \mathrm{softmax}(z)`. For row
    :math:`i` with label :math:`y_i`, over the :math:`N` labelled rows of the call:

    .. math::

        \tilde p_i = 1 + s_i(y_i)^2 - \frac{1}{N} \sum_j s_j(y_j)^2, \qquad
        \ell_i = -\alpha\, \tilde p_i \log p_i(y_i)
                 - \beta \sum_{k \neq y_i} \frac{1 / r_i(k)}{\sum_{m \neq y_i} 1 / r_i(m)} \log q_i(k)

    where :math:`p = \mathrm{softmax}(z)`, :math:`q` is the softmax over the non-target classes and
    :math:`r_i(k) \in \{1, \dots, C\}` is the rank of class :math:`k` among *all* :math:`C` classes,
    the target included, by the score

    .. math::

        \rho_i(k) = \frac{\log s_i(k)}{1 - \log s_i(y_i) + 10^{-6}}
                    \;\Big[ + \frac{w_i(k)}{1 - w_i(y_i) + 10^{-6}} \Big]

    (highest first, ties in class order): Zipf's law :math:`1/r` over the :math:`C` ranks, the
    target's weight dropped and the rest renormalised. The ranking follows the official code
    (github.com/yzd-v/cls_KD, ``mmcls/models/dis_losses/uskd.py``, ``USKDLoss.forward``); a literal
    reading of the paper would rank only the :math:`C - 1` non-target classes (weights
    :math:`1/r` over :math:`H_{C-1}`) by the sum of both heads' non-target probabilities, whereas the
    code ranks with the target in place and adds the student's *log*-probabilities (scaled by
    :math:`1 - \log s(y)`) to the weak head's non-target probabilities :math:`w` -- the bracketed
    term, present only when ``weak_logits`` is given. Without the weak head, :math:`\rho` orders the
    classes exactly as the soft-label logits do. The paper's weak auxiliary classifier on mid-level
    features (and its own label-smoothed loss) is not part of this function: pass its logits as
    ``weak_logits``. The batch mean in :math:`\tilde p` is over this call's labelled rows.

    Args:
        student_logits: ``[..., C]`` logits, :math:`C \geq 2`.
        target: ``[...]`` class indices; ``ignore_index`` rows are skipped like masked rows.
        alpha: weight of the target term.
        beta: weight of the non-target term.
        soft_label_logits: ``[..., C]`` logits :math:`s` is computed from (for :math:`\tilde p` and
            :math:`\rho`; no gradient); default: ``student_logits`` detached.
        weak_logits: optional ``[..., C]`` logits of the weak auxiliary head, added to the rank score
            :math:`\rho` as in the official code (no gradient).
        mask: optional ``[...]`` boolean; False rows are ignored.
        reduction: ``"mean"`` over labelled valid rows, ``"sum"`` or ``"none"``.
        num_valid: global normaliser for ``"mean"``.
        ignore_index: target value of unlabelled rows.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> uskd_loss(z, torch.tensor([0, 1]), alpha=1.0, beta=0.1)
        tensor(0.4490)
        >>> uskd_loss(torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([0]), alpha=0.0, beta=1.0)
        tensor(1.1768)
    """
    check_reduction(reduction)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"uskd_loss needs at least 2 classes; got {num_classes}")
    source = student_logits.detach() if soft_label_logits is None else soft_label_logits.detach()
    if source.shape != student_logits.shape:
        raise ValueError(
            f"soft_label_logits {tuple(source.shape)} must have the student's shape {tuple(student_logits.shape)}"
        )
    if weak_logits is not None and weak_logits.shape != student_logits.shape:
        raise ValueError(
            f"weak_logits {tuple(weak_logits.shape)} must have the student's shape {tuple(student_logits.shape)}"
        )
    keep = labelled_mask(target, mask, ignore_index, student_logits.shape[:-1])
    s, src, y, index, lead = flatten_rows(student_logits, source, keep, target=target)
    y = check_targets(y, num_classes)
    log_p_y, _, log_q = split_at_target(s, y, 1.0)  # student: target log-prob, non-target softmax
    with torch.no_grad():
        weak = None
        if weak_logits is not None:
            weak = weak_logits.detach().reshape(-1, num_classes).to(compute_dtype(student_logits))
            weak = weak if index is None else weak.index_select(0, index)  # (N, C)
        src_log_p_y, _, _ = split_at_target(src, y, 1.0)
        confidence = src_log_p_y.exp() ** 2  # (N,)
        soft_target = 1.0 + confidence - (confidence.mean() if confidence.numel() else 0.0)
        zipf = zipf_non_target_labels(uskd_rank_scores(src, y, weak), y)  # (N, C)
    target_term = -soft_target * log_p_y.clamp_min(LOG_FLOOR)
    non_target = cross_entropy_rows(torch.log(zipf), log_q)
    return reduce_rows(alpha * target_term + beta * non_target, index, lead, reduction, num_valid)
