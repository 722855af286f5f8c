"""Consistency losses of semi-supervised teacher-student training: a teacher's outputs on unlabelled
inputs (a moving average of the student, the student itself on a weaker view, or a previous
generation) become the student's targets on a noisier view of the same inputs."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from distillery.functional._rows import (
    check_reduction,
    check_temperature,
    flatten_rows,
    log_probs,
    reduce_rows,
)


def pseudo_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    threshold: float = 0.95,
    *,
    hard: bool = True,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Cross-entropy to the teacher's confident predictions: FixMatch's unlabelled loss (hard labels)
    or Noisy Student's soft pseudo-labels, both with a confidence threshold.

    .. math::

        \mathcal{L} = \frac{1}{N} \sum_{n=1}^{N} \mathbb{1}\!\left[\max_c q_n(c) \ge \tau\right]
            H\!\left(\hat{q}_n, p_n\right), \qquad
        q_n = \mathrm{softmax}(t_n / T), \quad p_n = \mathrm{softmax}(s_n)

    where :math:`\hat{q}_n` is the one-hot :math:`\arg\max_c q_n(c)` (``hard``) or :math:`q_n`
    itself, and :math:`H(a, b) = -\sum_c a(c) \log b(c)`. Rows below the threshold add 0 but still
    count in :math:`N`: FixMatch divides by the size of the unlabelled batch, not by the number of
    confident rows ("FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", Sohn et al., NeurIPS 2020, Eq. 4, :math:`\tau = 0.95`). With ``hard=False`` and a
    low threshold it is the soft-label self-training of "Self-training with Noisy Student improves
    ImageNet classification" (Xie et al., CVPR 2020), which keeps images whose teacher confidence is
    above 0.3. The student's logits are not tempered.

    Args:
        student_logits: ``[..., C]`` the student on the strongly noised view.
        teacher_logits: ``[..., C]`` the teacher on the weak (or clean) view; no gradient flows into it.
        threshold: :math:`\tau` in ``[0, 1]``; 0 keeps every row.
        hard: one-hot targets (FixMatch) or the teacher's distribution (soft pseudo-labels).
        temperature: :math:`T > 0` of the teacher's softmax (1 in both papers).
        mask: optional ``[...]`` boolean; False rows are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``).
        num_valid: with ``"mean"``, divide by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[4.0, 0.0], [0.0, 0.1]])  # confident on row 0 only
        >>> pseudo_label_loss(s, t, threshold=0.9)       # -log softmax(s_0)[0] / 2
        tensor(0.0635)
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits.detach(), mask)
    q = log_probs(t, temperature).exp()
    confidence, label = q.max(-1)
    log_p = F.log_softmax(s, dim=-1)
    if hard:
        per_row = -log_p.gather(-1, label[:, None]).squeeze(-1)
    else:
        per_row = -(q * log_p).sum(-1)
    per_row = per_row * (confidence >= threshold).to(per_row.dtype)
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def consistency_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Mean Teacher's consistency cost: the squared distance between the two softmax outputs.

    .. math::

        \mathcal{L} = \frac{1}{N} \sum_{n=1}^{N} \frac{1}{C} \sum_{c=1}^{C}
            \left( p_n(c) - q_n(c) \right)^2, \qquad
        p_n = \mathrm{softmax}(s_n / T), \quad q_n = \mathrm{softmax}(t_n / T)

    From "Mean teachers are better role models: Weight-averaged consistency targets improve
    semi-supervised deep learning results" (Tarvainen and Valpola, NeurIPS 2017). The paper writes
    the squared error summed over classes; the official code (``softmax_mse_loss``) divides that sum
    by the number of classes, which is followed here (a factor C that the consistency weight absorbs).
    The gradient flows into the student only.

    Args:
        student_logits: ``[..., C]`` the student on its noised view.
        teacher_logits: ``[..., C]`` the teacher (an EMA of the student) on its own noised view.
        temperature: :math:`T > 0` on both sides (1 in the paper).
        mask: optional ``[...]`` boolean; False rows are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``).
        num_valid: with ``"mean"``, divide by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> consistency_mse(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]))  # 2 (0.5 - 0.8808)^2 / 2
        tensor(0.1450)
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits.detach(), mask)
    p, q = log_probs(s, temperature).exp(), log_probs(t, temperature).exp()
    per_row = (p - q).pow(2).mean(-1)
    return reduce_rows(per_row, index, lead, reduction, num_valid)


__all__ = ["consistency_mse", "pseudo_label_loss"]
