"""Feature-level distillation: a student's (projected) features regress onto the teacher's."""

from __future__ import annotations

from torch import Tensor

from distillery.functional._rows import check_reduction, compute_dtype, reduce_rows


def hint_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Feature hint: mean squared difference between student and teacher features, per row.

    .. math::

        \ell_i = \frac{1}{F} \sum_{f=1}^{F} \left( s_{i,f} - t_{i,f} \right)^2

    averaged over the valid rows ``i``. The student side is usually a learnt projection of an
    intermediate feature onto the teacher's feature width ("FitNets: Hints for Thin Deep Nets",
    Romero et al., ICLR 2015); in multi-exit self-distillation the teacher side is the network's own
    deepest feature ("Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks
    via Self Distillation", Zhang et al., ICCV 2019). Averaging over the F feature dimensions (not
    summing) keeps the scale independent of the feature width. The function does not detach the
    teacher: pass ``teacher_features.detach()`` when the teacher side must not learn.

    Args:
        student_features: ``[..., F]`` student features; leading dims of any rank are flattened into rows.
        teacher_features: ``[..., F]`` teacher features (the same shape).
        mask: optional ``[...]`` boolean; False rows are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
        >>> hint_loss(s, t)  # rows: (0 + 4) / 2 = 2 and (9 + 1) / 2 = 5
        tensor(3.5000)
        >>> hint_loss(s, t, mask=torch.tensor([True, False]), reduction="none")
        tensor([2., 0.])
    """
    check_reduction(reduction)
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same shape; project the student's features "
            "to the teacher's width first"
        )
    if student_features.dim() < 1 or student_features.shape[-1] == 0:
        raise ValueError(f"features need a non-empty last (feature) dim; got {tuple(student_features.shape)}")
    lead = student_features.shape[:-1]
    dtype = compute_dtype(student_features)
    s = student_features.reshape(-1, student_features.shape[-1]).to(dtype)  # (N, F)
    t = teacher_features.reshape(-1, teacher_features.shape[-1]).to(dtype)  # (N, F)
    index = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected the features' leading shape {tuple(lead)}"
            )
        index = mask.reshape(-1).to(bool).nonzero().squeeze(-1)
        s, t = s.index_select(0, index), t.index_select(0, index)
    per_row = (s - t).square().mean(-1)  # (N,)
    return reduce_rows(per_row, index, lead, reduction, num_valid)
