"""Relational distillation: match the structure among a batch's embeddings, not the embeddings.

Every function takes a student batch ``[N, D_s]`` and a teacher batch ``[N, D_t]`` (the widths may
differ: only relations between rows are compared) and an optional ``mask`` ``[N]`` (False rows are
dropped before anything is computed; all pairwise quantities are over the kept rows). Each returns
one scalar for the batch. With fewer kept rows than the relation needs (2, or 3 for
:func:`rkd_angle`) the result is 0, still connected to both inputs (a zero gradient), never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from distillery.functional._rows import compute_dtype

# Squared distances are floored here before the square root (the official RKD code's value), so
# that coincident points have a finite gradient.
DISTANCE_EPS = 1.0e-12
# Norms are floored here before dividing (F.normalize's default).
NORM_EPS = 1.0e-12


def rkd_distance(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""RKD distance loss: match the pairwise distances of a batch, each normalised by its mean.

    .. math::

        \psi_D(x_i, x_j) = \frac{\lVert x_i - x_j \rVert_2}{\mu}, \quad
        \mu = \frac{1}{N(N-1)} \sum_{i \ne j} \lVert x_i - x_j \rVert_2, \qquad
        \mathcal{L} = \frac{1}{N^2} \sum_{i=1}^{N} \sum_{j=1}^{N}
            h_1\!\left( \psi_D(s_i, s_j) - \psi_D(t_i, t_j) \right)

    with the Huber (smooth L1, :math:`\beta = 1`) loss :math:`h_1`. From "Relational Knowledge
    Distillation" (Park, Kim, Lu & Cho, CVPR 2019). Normalising by the mean distance makes the loss
    invariant to a uniform scaling (and, like any distance, to translations and rotations) of
    either side.

    This follows the official code (github.com/lenscloth/RKD, ``RkdDistance``): distances are
    :math:`\sqrt{\max(d^2, 10^{-12})}` with the diagonal set to 0, :math:`\mu` is the mean of the
    off-diagonal entries, and ``F.smooth_l1_loss`` averages over the **full** :math:`N \times N`
    matrix, diagonal included: its N zeros add nothing to the sum but count in the denominator, so
    the value is :math:`(N-1)/N` times the mean over the :math:`N(N-1)` off-diagonal pairs. The
    paper's own weights (25 for this loss) were tuned with this normalisation. Unlike the
    official code, the teacher side is not detached here (pass ``teacher.detach()``), and both
    batches are centred before the Gram-matrix form of the squared distances (same values, less
    cancellation in float32).

    Args:
        student: ``[N, D_s]`` student embeddings.
        teacher: ``[N, D_t]`` teacher embeddings (the same N; any width).
        mask: optional ``[N]`` boolean; False rows are dropped.

    Returns:
        A scalar (0 with fewer than 2 kept rows). Computed in float32 (float64 inputs stay float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a right isosceles triangle
        >>> t = torch.tensor([[0.0], [1.0], [2.0]]) * 10  # three points on a line
        >>> rkd_distance(s, t)
        tensor(0.0717)
        >>> rkd_distance(s, 3 * s + 1) < 1e-6  # a scaled, shifted copy: nothing to learn
        tensor(True)
    """
    s, t = _kept_rows(student, teacher, mask, "rkd_distance")
    n = s.shape[0]
    if n < 2:
        return _zero(s, t)
    d_s = _normalised_distances(s)  # (N, N)
    d_t = _normalised_distances(t)  # (N, N)
    return F.smooth_l1_loss(d_s, d_t, reduction="mean", beta=1.0)


def rkd_angle(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""RKD angle loss: match the angles that every triple of a batch's embeddings forms.

    .. math::

        \psi_A(x_i, x_j, x_k) = \cos \angle x_i x_j x_k
            = \left\langle \frac{x_i - x_j}{\lVert x_i - x_j \rVert_2},
                           \frac{x_k - x_j}{\lVert x_k - x_j \rVert_2} \right\rangle, \qquad
        \mathcal{L} = \frac{1}{N^3} \sum_{i,j,k} h_1\!\left( \psi_A(s_i, s_j, s_k)
            - \psi_A(t_i, t_j, t_k) \right)

    with the Huber (smooth L1, :math:`\beta = 1`) loss :math:`h_1`. From "Relational Knowledge
    Distillation" (Park, Kim, Lu & Cho, CVPR 2019). Angles are invariant to scaling, translating
    and rotating (any orthogonal map of) either side.

    This follows the official code (github.com/lenscloth/RKD, ``RKdAngle``): the unit vectors
    :math:`(x_i - x_j) / \max(\lVert x_i - x_j \rVert, 10^{-12})` of all :math:`N^2` ordered pairs
    (the zero vector for :math:`i = j`), their :math:`N \times N \times N` inner products, and
    ``F.smooth_l1_loss`` averaged over **all** :math:`N^3` entries: those with :math:`i = j` or
    :math:`k = j` are 0 on both sides and those with :math:`i = k` are 1 on both sides, so they add
    nothing but count in the denominator; the value is :math:`(N-1)(N-2)/N^2` times the mean over
    the :math:`N(N-1)(N-2)` proper triples. The paper's weight (50 for this loss) was tuned with
    this normalisation. The teacher is not detached here (pass ``teacher.detach()``). The inner
    products come from the Gram matrix (:math:`O(N^2 D + N^3)`; the official code forms the
    ``[N, N, D]`` differences, :math:`O(N^3 D)`); memory grows as :math:`N^3` per side.

    Args:
        student: ``[N, D_s]`` student embeddings.
        teacher: ``[N, D_t]`` teacher embeddings (the same N; any width).
        mask: optional ``[N]`` boolean; False rows are dropped.

    Returns:
        A scalar (0 with fewer than 3 kept rows). Computed in float32 (float64 inputs stay float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # angles 90, 45, 45 degrees
        >>> t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])  # equilateral: 60 each
        >>> rkd_angle(s, t)
        tensor(0.0124)
    """
    s, t = _kept_rows(student, teacher, mask, "rkd_angle")
    if s.shape[0] < 3:
        return _zero(s, t)
    return F.smooth_l1_loss(_cosine_angles(s), _cosine_angles(t), reduction="mean", beta=1.0)


def similarity_preserving(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""Similarity-preserving KD: match the row-normalised Gram matrices of a batch's activations.

    .. math::

        G = f f^\top, \quad \tilde G_{i,\cdot} = \frac{G_{i,\cdot}}{\max(\lVert G_{i,\cdot} \rVert_2,
        10^{-12})}, \qquad
        \mathcal{L} = \frac{1}{B^2} \left\lVert \tilde G^s - \tilde G^t \right\rVert_F^2

    where :math:`f \in \mathbb{R}^{B \times F}` are a layer's activations flattened per sample. From
    "Similarity-Preserving Knowledge Distillation" (Tung & Mori, ICCV 2019); the paper sums this
    over layer pairs with weight :math:`\gamma / |\mathcal{I}|` (3000 on CIFAR-10). The normalisation
    makes it invariant to scaling either side. Same as the reference implementations (the paper's
    equations and RepDistiller's ``Similarity``), with :math:`B` the number of kept rows.

    Args:
        student: ``[B, ...]`` student activations (flattened to ``[B, F_s]``).
        teacher: ``[B, ...]`` teacher activations (the same B; any other shape).
        mask: optional ``[B]`` boolean; False samples are dropped.

    Returns:
        A scalar (0 with fewer than 2 kept rows). Computed in float32 (float64 inputs stay float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal samples
        >>> t = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
        >>> similarity_preserving(s, t)  # G_t's rows (2, 1) / sqrt(5) and (1, 1) / sqrt(2) against I
        tensor(0.1992)
    """
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() < 2:
            raise ValueError(
                f"{side} activations must be [B, ...] with at least one feature dim; got {tuple(x.shape)}"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hold different batch "
            "sizes; both sides must see the same N samples (the other dims may differ)"
        )
    s, t = _kept_rows(
        student.flatten(1),  # (B, F_s)
        teacher.flatten(1),  # (B, F_t)
        mask,
        "similarity_preserving",
    )
    n = s.shape[0]
    if n < 2:
        return _zero(s, t)
    g_s = F.normalize(s @ s.T, p=2.0, dim=1, eps=NORM_EPS)  # (B, B)
    g_t = F.normalize(t @ t.T, p=2.0, dim=1, eps=NORM_EPS)  # (B, B)
    return (g_s - g_t).square().sum() / (n * n)


def linear_cka_loss(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""One minus linear centred kernel alignment (CKA) between two batches of representations.

    .. math::

        \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}
            {\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}, \qquad
        \mathcal{L} = 1 - \mathrm{CKA}(X, Y)

    where :math:`X` (student, ``[N, D_s]``) and :math:`Y` (teacher, ``[N, D_t]``) have centred
    columns. From "Similarity of Neural Network Representations Revisited" (Kornblith, Norouzi, Lee
    & Hinton, ICML 2019). It lies in :math:`[0, 1]`, is 0 when the two representations agree up to
    an orthogonal map, an isotropic scaling and a translation, and compares widths freely, so no
    projector is needed. The equivalent Gram form :math:`\langle XX^\top, YY^\top\rangle_F /
    (\lVert XX^\top \rVert_F \lVert YY^\top \rVert_F)` is used when :math:`N^2 \le D_s D_t`
    (cheaper). Each side is divided by its Frobenius norm first (the value is scale-free) so that
    float32 does not overflow, and the denominator is floored at :math:`10^{-12}`, so that a side whose
    centred values are exactly zero gives CKA 0 (loss 1), not NaN.

    Args:
        student: ``[N, D_s]`` student representations.
        teacher: ``[N, D_t]`` teacher representations (the same N; any width).
        mask: optional ``[N]`` boolean; False rows are dropped (the centring uses the kept rows).

    Returns:
        A scalar (0 with fewer than 2 kept rows). Computed in float32 (float64 inputs stay float64).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -2.0]])
        >>> linear_cka_loss(x, x[:, :1])  # teacher: the first coordinate; CKA = 4 / (2 sqrt(68))
        tensor(0.7575)
        >>> linear_cka_loss(x, 5 * x.flip(1) + 1).abs() < 1e-6  # permuted, scaled, shifted
        tensor(True)
    """
    s, t = _kept_rows(student, teacher, mask, "linear_cka_loss")
    n = s.shape[0]
    if n < 2:
        return _zero(s, t)
    x = _centred_unit(s)  # (N, D_s)
    y = _centred_unit(t)  # (N, D_t)
    if n * n <= x.shape[1] * y.shape[1]:
        gram_x, gram_y = x @ x.T, y @ y.T  # (N, N) each
        cross = (gram_x * gram_y).sum()  # <XX^T, YY^T>_F = ||Y^T X||_F^2
        norm_x, norm_y = torch.linalg.matrix_norm(gram_x), torch.linalg.matrix_norm(gram_y)
    else:
        cross = (y.T @ x).square().sum()  # ||Y^T X||_F^2
        norm_x, norm_y = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    return 1.0 - cross / (norm_x * norm_y).clamp_min(NORM_EPS)


# ---------------------------------------------------------------------------------------------
# Shapes, masks and the pieces shared by the functions above.
# ---------------------------------------------------------------------------------------------


def _kept_rows(student: Tensor, teacher: Tensor, mask: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
    """Check ``[N, D_s]`` / ``[N, D_t]`` and a ``[N]`` mask; return the kept rows in the compute dtype."""
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(
                f"{name} needs {side} embeddings [N, D] with D > 0; got {tuple(x.shape)} "
                "(flatten any other dims into D first)"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hold different numbers "
            "of rows; both sides must embed the same N samples (the widths may differ)"
        )
    dtype = compute_dtype(student)
    s, t = student.to(dtype), teacher.to(dtype)
    if mask is None:
        return s, t
    if tuple(mask.shape) != (student.shape[0],):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [N] = ({student.shape[0]},)")
    index = mask.to(torch.bool).nonzero().squeeze(-1)
    return s.index_select(0, index), t.index_select(0, index)


def _zero(s: Tensor, t: Tensor) -> Tensor:
    """0, connected to both (kept) inputs so that ``backward`` works and gives zero gradients."""
    return s.sum() * 0.0 + t.sum().to(s.dtype) * 0.0


def _normalised_distances(x: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``[N, N]`` (diagonal 0) divided by their off-diagonal mean."""
    n = x.shape[0]
    x = x - x.mean(0, keepdim=True)  # distances are translation-free; centring limits cancellation
    sq_norms = x.square().sum(-1)  # (N,)
    squared = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)).clamp_min(DISTANCE_EPS)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    distances = squared.sqrt().masked_fill(eye, 0.0)  # (N, N)
    return distances / (distances.sum() / (n * (n - 1)))


def _cosine_angles(x: Tensor) -> Tensor:
    """``[N, N, N]``: entry ``(j, i, k)`` is the cosine of the angle at ``x_j`` between ``x_i`` and ``x_k``.

    From the Gram matrix ``G = X X^T`` (``O(N^2 D + N^3)``, where forming the ``[N, N, D]`` differences
    as the official code does costs ``O(N^3 D)``): ``<x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj``
    and ``|x_i - x_j|^2 = G_ii - 2 G_ij + G_jj``. Centring first keeps float32 cancellation small.
    """
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.T  # (N, N)
    diag = gram.diagonal()
    squared = (diag[:, None] - 2.0 * gram + diag[None, :]).clamp_min(0.0)  # (N, N): |x_i - x_j|^2
    # the official code's zero unit vector for i = j (or coincident points): cosine 0; the square
    # root is taken of 1 there so that no infinite gradient reaches the masked entries
    zero = squared < NORM_EPS**2
    norms = torch.where(zero, torch.ones_like(squared), squared).sqrt()
    # dot[j, i, k] = G[i, k] - G[j, i] - G[j, k] + G[j, j]
    dot = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + diag[:, None, None]
    cos = dot / (norms.unsqueeze(2) * norms.unsqueeze(1))
    return cos.masked_fill(zero.unsqueeze(2) | zero.unsqueeze(1), 0.0)


def _centred_unit(x: Tensor) -> Tensor:
    x = x - x.mean(0, keepdim=True)
    return x / torch.linalg.matrix_norm(x).clamp_min(NORM_EPS)
