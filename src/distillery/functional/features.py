"""Feature-level distillation: a student's (projected) features regress onto the teacher's.

Row-wise distances between features of the same width (:func:`hint_loss`, :func:`feature_distance`)
and attention maps of convolutional feature maps (:func:`attention_transfer`), which compare
spatial maps and so allow different channel counts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from distillery.functional._rows import check_reduction, compute_dtype, reduce_rows

FEATURE_DISTANCES = ("cosine", "mse", "smooth_l1")

# Norms are floored here before dividing (torch.cosine_similarity's default).
COSINE_EPS = 1.0e-8


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
    # the "mse" distance of feature_distance: the same checks, rows and reductions
    return feature_distance(
        student_features, teacher_features, kind="mse", mask=mask, reduction=reduction, num_valid=num_valid
    )


def feature_distance(
    student: Tensor,
    teacher: Tensor,
    *,
    kind: str = "mse",
    beta: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""A row-wise distance between student and teacher features: MSE, smooth L1 or cosine.

    .. math::

        \ell_i^{\mathrm{mse}} = \frac{1}{F} \sum_{f=1}^{F} (s_{i,f} - t_{i,f})^2, \qquad
        \ell_i^{\mathrm{smooth\_l1}} = \frac{1}{F} \sum_{f=1}^{F} h_\beta(s_{i,f} - t_{i,f}), \qquad
        \ell_i^{\mathrm{cosine}} = 1 - \frac{s_i \cdot t_i}
            {\max(\lVert s_i \rVert, \epsilon) \, \max(\lVert t_i \rVert, \epsilon)}

    with torch's smooth L1 :math:`h_\beta(x) = x^2 / (2\beta)` for :math:`|x| < \beta`, else
    :math:`|x| - \beta / 2` (:math:`\beta = 0` is plain L1), and :math:`\epsilon = 10^{-8}`
    (``torch.cosine_similarity``'s). The per-row values are averaged over the valid rows ``i``.

    ``"mse"`` is the FitNets hint ("FitNets: Hints for Thin Deep Nets", Romero et al., ICLR 2015),
    identical to :func:`hint_loss`. ``"cosine"`` is DistilBERT's cosine embedding loss between the
    student's and the teacher's last hidden states, one value per token ("DistilBERT, a distilled
    version of BERT: smaller, faster, cheaper and lighter", Sanh et al., NeurIPS 2019 EMC^2
    workshop); it ignores the features' scale. The student side is usually projected to the
    teacher's width first; the function does not detach the teacher.

    Args:
        student: ``[..., F]`` student features; leading dims of any rank are flattened into rows.
        teacher: ``[..., F]`` teacher features (the same shape).
        kind: ``"mse"``, ``"smooth_l1"`` or ``"cosine"``.
        beta: the smooth L1 threshold :math:`\beta \ge 0` (only with ``kind="smooth_l1"``).
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
        >>> feature_distance(s, t, kind="smooth_l1")  # rows: (0 + 1.5) / 2 and (2.5 + 0.5) / 2
        tensor(1.1250)
        >>> feature_distance(s, t, kind="cosine", reduction="none")  # 1 - 1/sqrt(5); a zero row: 1
        tensor([0.5528, 1.0000])
    """
    check_reduction(reduction)
    if kind not in FEATURE_DISTANCES:
        raise ValueError(f"kind must be one of {', '.join(FEATURE_DISTANCES)}; got {kind!r}")
    if kind == "smooth_l1" and not beta >= 0:
        raise ValueError(f"beta must be >= 0 (0 is plain L1); got {beta}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
            "must have the same shape; project the student's features to the teacher's width first"
        )
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"features need a non-empty last (feature) dim; got {tuple(student.shape)}")
    lead = student.shape[:-1]
    dtype = compute_dtype(student)
    s = student.reshape(-1, student.shape[-1]).to(dtype)  # (N, F)
    t = teacher.reshape(-1, teacher.shape[-1]).to(dtype)  # (N, F)
    index = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected the features' leading shape {tuple(lead)}"
            )
        index = mask.reshape(-1).to(torch.bool).nonzero().squeeze(-1)
        s, t = s.index_select(0, index), t.index_select(0, index)
    if kind == "mse":
        per_row = (s - t).square().mean(-1)  # (N,)
    elif kind == "smooth_l1":
        per_row = F.smooth_l1_loss(s, t, reduction="none", beta=beta).mean(-1)  # (N,)
    else:
        norm_s = torch.linalg.vector_norm(s, dim=-1).clamp_min(COSINE_EPS)  # (N,)
        norm_t = torch.linalg.vector_norm(t, dim=-1).clamp_min(COSINE_EPS)  # (N,)
        per_row = 1.0 - (s * t).sum(-1) / (norm_s * norm_t)  # (N,)
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def attention_transfer(
    student_maps: Tensor,
    teacher_maps: Tensor,
    *,
    p: float = 2,
    reduction: str = "mean",
) -> Tensor:
    r"""Attention transfer: match the normalised spatial attention maps of two feature maps.

    .. math::

        a(A) = \frac{q(A)}{\max(\lVert q(A) \rVert_2, 10^{-12})}, \quad
        q(A)_{h,w} = \frac{1}{C} \sum_{c=1}^{C} |A_{c,h,w}|^p, \qquad
        \ell_b = \frac{1}{HW} \sum_{h,w} \left( a(S_b)_{h,w} - a(T_b)_{h,w} \right)^2

    averaged over the batch. From "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer" (Zagoruyko & Komodakis, ICLR 2017). Since
    the channels are pooled away, the student and the teacher may have different channel counts,
    but the same spatial size.

    This follows the official code (github.com/szagoruyko/attention-transfer, ``at`` and
    ``at_loss``), which differs from the paper's formula in two ways: (1) it averages
    :math:`|A_c|^p` over the channels where the paper sums them, a constant factor that the
    normalisation removes, so the value is the same; (2) the paper's loss is the p-norm of the
    difference :math:`\lVert a(S) - a(T) \rVert_p` (with p = 2: the Euclidean norm), the code's is
    the squared difference averaged over the :math:`HW` positions (and over the batch). The
    official code hard-codes p = 2 (``x.pow(2)``); for other p this uses the paper's
    :math:`|A|^p`, the same for even p. The paper sets the weight :math:`\beta` of its layer sum
    to :math:`10^3` divided by the number of attention-map elements and the batch size, that is,
    for an average over positions and samples like this one.

    Args:
        student_maps: ``[B, C_s, H, W]`` student feature maps.
        teacher_maps: ``[B, C_t, H, W]`` teacher feature maps (the same B, H and W).
        p: the exponent :math:`p > 0` applied to the activations' magnitudes.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``[B]``).

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # [1, 1, 2, 2]: all attention on one place
        >>> t = torch.ones(1, 3, 2, 2)  # [1, 3, 2, 2]: uniform attention
        >>> attention_transfer(s, t)  # a(S) = (1, 0, 0, 0), a(T) = (1/2, 1/2, 1/2, 1/2)
        tensor(0.2500)
    """
    check_reduction(reduction)
    if not p > 0:
        raise ValueError(f"p must be > 0; got {p}")
    for side, x in (("student", student_maps), ("teacher", teacher_maps)):
        if x.dim() != 4:
            raise ValueError(
                f"attention transfer needs {side} feature maps [B, C, H, W]; got {tuple(x.shape)}"
            )
    s_shape, t_shape = tuple(student_maps.shape), tuple(teacher_maps.shape)
    if s_shape[0] != t_shape[0]:
        raise ValueError(f"student maps {s_shape} and teacher maps {t_shape} differ in their batch size")
    if s_shape[2:] != t_shape[2:]:
        raise ValueError(
            f"student maps {s_shape} and teacher maps {t_shape} differ in their spatial size (H, W); "
            "choose layers with the same H, W or interpolate one side's maps to the other's size first"
        )
    dtype = compute_dtype(student_maps)
    a_s = _attention_map(student_maps.to(dtype), p)  # (B, H*W)
    a_t = _attention_map(teacher_maps.to(dtype), p)  # (B, H*W)
    per_sample = (a_s - a_t).square().mean(-1)  # (B,)
    return reduce_rows(per_sample, None, student_maps.shape[:1], reduction, None)


def _attention_map(maps: Tensor, p: float) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W]``: channel mean of ``|A|^p``, L2-normalised per sample."""
    q = maps.abs().pow(p).mean(1).reshape(maps.shape[0], -1)  # (B, H*W)
    return F.normalize(q, p=2.0, dim=1, eps=1e-12)
