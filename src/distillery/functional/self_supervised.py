"""Self-supervised self-distillation: a student matches a momentum teacher's outputs on other views.

* :func:`dino_loss`: cross-entropy from the centred, sharpened teacher distribution of each global
  view to the student distribution of every *other* view (DINO);
* :func:`ibot_patch_loss`: the same cross-entropy per patch token, on the patches masked in the
  student's view, between the same views (iBOT's masked image modelling term);
* :func:`update_center`: the centre both use, an EMA of the batch mean of the teacher outputs;
* :func:`data2vec_targets` and :func:`data2vec_loss`: regression of the teacher's normalised,
  averaged top-K block outputs at the masked positions (data2vec);
* :func:`byol_loss`: normalised MSE between a predictor's output and the teacher's projection (BYOL);
* :func:`koleo_loss`: the Kozachenko-Leonenko entropy regulariser on a batch of embeddings (DINOv2).

Views are stacked on a leading axis: ``[V, B, K]`` holds V views of the same B images, so row ``b``
of every view is the same image. The teacher side is never detached here: callers pass teacher
outputs computed without gradients. Everything is computed in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from distillery.functional._rows import compute_dtype

# Norms are floored here before dividing (F.normalize's default).
NORM_EPS = 1.0e-12
# DINOv2's KoLeo: eps inside the pairwise distance (nn.PairwiseDistance(2, eps=1e-8)) and in the log.
KOLEO_EPS = 1.0e-8


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def _views(x: Tensor, name: str, ndim: int) -> Tensor:
    if x.dim() != ndim:
        shape = "[V, B, K]" if ndim == 3 else "[V, B, P, K]"
        raise ValueError(f"{name} must be {shape} (views stacked first); got shape {list(x.shape)}")
    return x.to(compute_dtype(x))


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    *,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> Tensor:
    r"""DINO: cross-entropy from each centred, sharpened teacher view to every other student view.

    .. math::

        P_t^{(i)} = \mathrm{softmax}\!\left(\frac{g_t(x_i) - c}{\tau_t}\right), \quad
        P_s^{(j)} = \mathrm{softmax}\!\left(\frac{g_s(x_j)}{\tau_s}\right), \qquad
        \mathcal{L} = \frac{1}{|\mathcal{P}|} \sum_{(i, j) \in \mathcal{P}} \frac{1}{B} \sum_{b=1}^{B}
            -\sum_{k=1}^{K} P_{t,bk}^{(i)} \log P_{s,bk}^{(j)}

    over the pairs :math:`\mathcal{P} = \{(i, j) : i < V_t,\ j < V_s,\ i \ne j\}`: the teacher sees
    the :math:`V_t` global views, the student all :math:`V_s` views (the global ones first, in the
    same order, then the local crops), and a view is never its own target. From "Emerging
    Properties in Self-Supervised Vision Transformers" (Caron et al., ICCV 2021). Centring (:math:`c`,
    :func:`update_center`) keeps one dimension from dominating, sharpening
    (:math:`\tau_t < \tau_s`) keeps the output from going uniform; together they avoid collapse.

    As in the official code (``DINOLoss``), each pair's value is its mean over the batch and the
    loss is the plain mean over pairs (``2 (V_s - 1)`` pairs for ``V_t = 2``).

    Args:
        student: ``[V_s, B, K]`` student head outputs (logits) for every view.
        teacher: ``[V_t, B, K]`` teacher head outputs for the global views (``V_t <= V_s``), computed
            without gradients.
        center: ``[K]`` the centre subtracted from the teacher outputs.
        student_temperature: :math:`\tau_s` (the paper's 0.1).
        teacher_temperature: :math:`\tau_t` (0.04 after the paper's warm-up from 0.04 to 0.07 is
            optional; see :func:`distillery.train.schedules.warmup_then_constant`).

    Returns:
        A scalar.

    Example:
        >>> import torch
        >>> s = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]])  # 3 views, 1 image, K = 2
        >>> t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])                # the 2 global views
        >>> dino_loss(s, t, torch.zeros(2), student_temperature=1.0, teacher_temperature=1.0)
        tensor(1.1411)
    """
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    s, t = _views(student, "student", 3), _views(teacher, "teacher", 3)
    v_s, v_t = s.shape[0], t.shape[0]
    if v_t > v_s or s.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"the teacher's global views must be the first views of the student's, with the same batch and "
            f"output size; got student {list(s.shape)} and teacher {list(t.shape)}"
        )
    if v_s < 2:
        raise ValueError(f"DINO needs at least 2 views (a view is never its own target); got {v_s}")
    targets = F.softmax((t - center.to(t.dtype)) / teacher_temperature, dim=-1)  # [V_t, B, K]
    log_p = F.log_softmax(s / student_temperature, dim=-1)  # [V_s, B, K]
    # ce[i, j] = mean over b of -sum_k P_t^(i) log P_s^(j)
    ce = -torch.einsum("ibk,jbk->ij", targets, log_p) / s.shape[1]  # [V_t, V_s]
    off = ~torch.eye(v_t, v_s, dtype=torch.bool, device=s.device)
    return ce[off].mean()


def ibot_patch_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    center: Tensor,
    *,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.07,
) -> Tensor:
    r"""iBOT's masked image modelling term: DINO's cross-entropy per patch, on the masked patches.

    .. math::

        \mathcal{L} = \frac{1}{V} \sum_{v=1}^{V} \frac{1}{B} \sum_{b=1}^{B}
            \frac{\sum_{p} m_{vbp} \left( -\sum_k P^{(v)}_{t,bpk} \log P^{(v)}_{s,bpk} \right)}
                 {\max(1, \sum_p m_{vbp})}

    with :math:`P_t = \mathrm{softmax}((g_t - c) / \tau_t)` of the teacher's patch outputs on the
    *unmasked* view and :math:`P_s = \mathrm{softmax}(g_s / \tau_s)` of the student's on the masked
    view; unlike the [CLS] term (:func:`dino_loss`), student and teacher see the **same** view. From
    "iBOT: Image BERT Pre-Training with Online Tokenizer" (Zhou et al., ICLR 2022). As in the
    official code (``iBOTLoss``), each image averages over its own masked patches (an image with
    none adds 0), then images and views are averaged.

    Args:
        student: ``[V, B, P, K]`` student patch outputs on the masked global views.
        teacher: ``[V, B, P, K]`` teacher patch outputs on the same views unmasked (no gradients).
        mask: ``[V, B, P]`` boolean, True on the patches masked in the student's input.
        center: ``[K]`` the patch centre (kept apart from the [CLS] centre).
        student_temperature: :math:`\tau_s` (0.1).
        teacher_temperature: :math:`\tau_t` for the patches (iBOT: 0.07 after warm-up).

    Returns:
        A scalar.

    Example:
        >>> import torch
        >>> s = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])  # 1 view, 1 image, 2 patches, K = 2
        >>> t = torch.tensor([[[[0.0, 2.0], [5.0, 5.0]]]])
        >>> m = torch.tensor([[[True, False]]])            # only patch 0 was masked
        >>> ibot_patch_loss(s, t, m, torch.zeros(2), student_temperature=1.0, teacher_temperature=1.0)
        tensor(1.8885)
    """
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    s, t = _views(student, "student", 4), _views(teacher, "teacher", 4)
    if s.shape != t.shape or mask.shape != s.shape[:3]:
        raise ValueError(
            f"student and teacher patch outputs must have the same shape [V, B, P, K] and mask [V, B, P]; got "
            f"student {list(s.shape)}, teacher {list(t.shape)}, mask {list(mask.shape)}"
        )
    targets = F.softmax((t - center.to(t.dtype)) / teacher_temperature, dim=-1)
    ce = -(targets * F.log_softmax(s / student_temperature, dim=-1)).sum(-1)  # [V, B, P]
    m = mask.to(ce.dtype)
    per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [V, B]
    return per_image.mean()


def update_center(
    center: Tensor,
    teacher: Tensor,
    *,
    momentum: float = 0.9,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""The next centre: an EMA of the mean teacher output over the global batch.

    .. math::

        c \leftarrow m\, c + (1 - m)\, \frac{1}{N} \sum_{n=1}^{N} g_t(x_n)

    where the mean runs over every row of ``teacher`` (all views, images and, for patch outputs, all
    patches) **on every process**: ``all_reduce`` sums a tensor across processes (e.g.
    ``accelerator.reduce(x, "sum")``) and is applied to the sum and the row count before dividing,
    so N processes give the centre one process would with the whole batch (DINO's
    ``update_center``; iBOT's patch centre, which averages patches then images, is the same mean
    since every image has the same number of patches). Pure: returns a new tensor, no gradient.

    Args:
        center: ``[K]`` the current centre.
        teacher: ``[..., K]`` this process's teacher outputs.
        momentum: :math:`m` in ``[0, 1]`` (DINO's 0.9).
        all_reduce: sums a tensor across processes; None for one process.

    Returns:
        ``[K]``, the updated centre.

    Example:
        >>> import torch
        >>> update_center(torch.zeros(2), torch.tensor([[1.0, 0.0], [3.0, 2.0]]), momentum=0.5)
        tensor([1.0000, 0.5000])
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"centre momentum must be in [0, 1]; got {momentum}")
    with torch.no_grad():
        rows = teacher.detach().reshape(-1, teacher.shape[-1]).to(compute_dtype(teacher))
        total = rows.sum(0)
        count = torch.tensor(float(rows.shape[0]), dtype=total.dtype, device=total.device)
        if all_reduce is not None:
            total, count = all_reduce(total), all_reduce(count)
        batch_center = total / count.clamp(min=1.0)
        return center.detach() * momentum + batch_center.to(center.dtype) * (1.0 - momentum)


def dino_target_entropies(
    teacher: Tensor,
    center: Tensor,
    temperature: float,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    r"""How much DINO's targets say about the image: two entropies, in units of :math:`\log K`.

    .. math::

        P_n = \mathrm{softmax}\!\left(\frac{g_t(x_n) - c}{\tau_t}\right), \qquad
        h_{\text{image}} = \frac{1}{N \log K} \sum_{n=1}^{N} H(P_n), \qquad
        h_{\text{mean}} = \frac{1}{\log K} H\!\left(\frac{1}{N} \sum_{n=1}^{N} P_n\right)

    over every row of ``teacher`` on every process (``all_reduce`` sums a tensor across processes, as
    in :func:`update_center`). :math:`h_{\text{image}} \to 1` when every target is uniform (too little
    sharpening), :math:`h_{\text{mean}} \to 0` when one prototype takes every image (too little
    centring); :math:`h_{\text{mean}} - h_{\text{image}} \ge 0` is the mutual information between image
    and prototype, near 0 in either collapse. The two curves of DINO's Figure 7 ("Emerging Properties in
    Self-Supervised Vision Transformers"). No gradient.

    Args:
        teacher: ``[..., K]`` teacher head outputs.
        center: ``[K]`` the centre.
        temperature: the teacher temperature :math:`\tau_t`.
        all_reduce: sums a tensor across processes; None for one process.

    Returns:
        ``(h_image, h_mean)`` as Python floats in [0, 1] (up to float32 rounding).

    Example:
        >>> import torch
        >>> h_image, h_mean = dino_target_entropies(torch.eye(4) * 50, torch.zeros(4), 1.0)
        >>> round(h_image, 6), round(h_mean, 6)  # one-hot targets, each image its own prototype
        (0.0, 1.0)
        >>> [round(h, 6) for h in dino_target_entropies(torch.ones(3, 4), torch.ones(4), 0.04)]
        [1.0, 1.0]
    """
    _check_temperature("temperature", temperature)
    with torch.no_grad():
        rows = teacher.detach().reshape(-1, teacher.shape[-1]).to(compute_dtype(teacher))
        p = ((rows - center.to(rows)) / temperature).softmax(-1)
        per_row = -(p * p.clamp_min(1e-30).log()).sum(-1)
        sums = torch.cat([per_row.sum()[None], p.sum(0), p.new_tensor([p.shape[0]])])
        if all_reduce is not None:
            sums = all_reduce(sums)
        n = sums[-1].clamp_min(1.0)
        mean = sums[1:-1] / n
        log_k = math.log(p.shape[-1])
        return float(sums[0] / n) / log_k, float(-(mean * mean.clamp_min(1e-30).log()).sum()) / log_k


def data2vec_targets(
    layers: Sequence[Tensor],
    top_k: int,
    *,
    instance_norm: bool = True,
    layer_norm_target: bool = False,
) -> Tensor:
    r"""data2vec's regression target: the average of the teacher's top-K block outputs, normalised.

    .. math::

        y_t = \frac{1}{K} \sum_{l = L - K + 1}^{L} \hat{a}^{\,l}_t, \qquad
        \hat{a}^{\,l}_{t,d} = \frac{a^l_{t,d} - \mu^l_d}{\sqrt{(\sigma^l_d)^2 + \epsilon}}

    where :math:`\mu^l_d, \sigma^l_d` are the mean and standard deviation of channel :math:`d` of
    block :math:`l` over the T positions of one sample (instance normalisation, ``F.instance_norm``,
    :math:`\epsilon = 10^{-5}`). From "data2vec: A General Framework for Self-supervised Learning in
    Speech, Vision and Language" (Baevski et al., ICML 2022). ``layer_norm_target`` applies a layer
    norm (no affine) to the average afterwards: the official vision recipe
    (``base_imagenet_d2v1.yaml``) uses that instead of the per-block instance norm, with K = 6; the
    paper's text describes the per-block instance norm, which is the default here.

    Args:
        layers: the teacher's block outputs ``[B, T, D]``, first block first (at least ``top_k``).
        top_k: K, how many of the last blocks to average.
        instance_norm: normalise each block over positions before averaging.
        layer_norm_target: layer-normalise the average over channels.

    Returns:
        ``[B, T, D]``, without gradient.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[1.0], [3.0]]])     # one block, B = 1, T = 2, D = 1
        >>> data2vec_targets([a * 10, a], top_k=1)  # instance norm: (x - 2) / 1
        tensor([[[-1.0000],
                 [ 1.0000]]])
    """
    if not 1 <= top_k <= len(layers):
        raise ValueError(f"top_k must be between 1 and the {len(layers)} block outputs given; got {top_k}")
    with torch.no_grad():
        out = []
        for layer in layers[-top_k:]:
            y = layer.detach().to(compute_dtype(layer))
            if instance_norm:
                y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
            out.append(y)
        y = torch.stack(out).mean(0)
        if layer_norm_target:
            y = F.layer_norm(y, y.shape[-1:])
        return y


def data2vec_loss(
    prediction: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    beta: float = 2.0,
    scale: float | None = None,
) -> Tensor:
    r"""data2vec's regression loss at the masked positions: smooth L1 (or MSE), summed over channels.

    .. math::

        \mathcal{L} = \frac{1}{|M|} \sum_{(b, t) \in M} s \sum_{d=1}^{D} \ell_\beta(f_{btd} - y_{btd}),
        \quad \ell_\beta(z) = \begin{cases} \tfrac{1}{2} z^2 / \beta & |z| \le \beta \\
            |z| - \tfrac{1}{2} \beta & \text{otherwise} \end{cases}

    (``F.smooth_l1_loss``; :math:`\beta = 0` is the squared error :math:`z^2`), with
    :math:`s = 1 / \sqrt{D}` unless ``scale`` is given. From "data2vec: A General Framework for
    Self-supervised Learning in Speech, Vision and Language" (Baevski et al., ICML 2022); the sum over
    channels, the :math:`1/\sqrt{D}` scale, the mean over masked positions and :math:`\beta = 2` for
    images follow the official code (``Data2VecVisionModel``, ``base_imagenet_d2v1.yaml``).

    Args:
        prediction: ``[B, T, D]`` the student's outputs (after its regression head) on the masked input.
        target: ``[B, T, D]`` :func:`data2vec_targets` of the teacher on the unmasked input.
        mask: ``[B, T]`` boolean, True at the masked positions (the only ones that count).
        beta: smooth-L1 transition point; 0 for the squared error.
        scale: multiplies the per-position sum (default :math:`1/\sqrt{D}`).

    Returns:
        A scalar (0, connected to ``prediction``, with no masked position).

    Example:
        >>> import torch
        >>> f = torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])
        >>> y = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
        >>> data2vec_loss(f, y, torch.tensor([[True, False]]), beta=2.0)  # (0.25 + 2) / sqrt(2)
        tensor(1.5910)
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    if prediction.shape != target.shape or mask.shape != prediction.shape[:2]:
        raise ValueError(
            f"prediction and target must be [B, T, D] of one shape and mask [B, T]; got prediction "
            f"{list(prediction.shape)}, target {list(target.shape)}, mask {list(mask.shape)}"
        )
    dtype = compute_dtype(prediction)
    f, y = prediction.to(dtype)[mask], target.to(dtype)[mask]  # [M, D]
    if beta == 0:
        per = F.mse_loss(f, y, reduction="none").sum(-1)
    else:
        per = F.smooth_l1_loss(f, y, reduction="none", beta=beta).sum(-1)
    s = 1.0 / math.sqrt(prediction.shape[-1]) if scale is None else scale
    if per.numel() == 0:
        return prediction.sum() * 0.0
    return per.mean() * s


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    r"""BYOL: squared distance between the L2-normalised prediction and target, per row.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_{b=1}^{B}
            \left\lVert \frac{q_b}{\lVert q_b \rVert} - \frac{z_b}{\lVert z_b \rVert} \right\rVert_2^2
            = \frac{1}{B} \sum_b \left( 2 - 2 \cos(q_b, z_b) \right)

    where :math:`q` is the online network's predictor output on one view and :math:`z` the target
    (EMA) network's projection of another view. From "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning" (Grill et al., NeurIPS 2020); the paper symmetrises by swapping the
    views, which the caller does by passing both directions stacked as rows.

    Args:
        prediction: ``[B, D]`` predictor outputs.
        target: ``[B, D]`` target projections (no gradients).

    Returns:
        A scalar in ``[0, 4]``.

    Example:
        >>> import torch
        >>> byol_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 5.0], [1.0, 0.0]]))
        tensor(1.)
    """
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(
            f"prediction and target must both be [B, D]; got {list(prediction.shape)} and {list(target.shape)}"
        )
    dtype = compute_dtype(prediction)
    q = F.normalize(prediction.to(dtype), dim=-1, eps=NORM_EPS)
    z = F.normalize(target.to(dtype), dim=-1, eps=NORM_EPS)
    return (2.0 - 2.0 * (q * z).sum(-1)).mean()


def koleo_loss(embeddings: Tensor) -> Tensor:
    r"""KoLeo: the Kozachenko-Leonenko differential-entropy estimate of a batch, to be minimised.

    .. math::

        \mathcal{L} = -\frac{1}{B} \sum_{b=1}^{B} \log\left( \rho_b + \epsilon \right), \qquad
        \rho_b = \min_{c \ne b} \lVert \hat{x}_b - \hat{x}_c + \epsilon \rVert_2

    on the L2-normalised embeddings :math:`\hat{x}`: pushing each point away from its nearest
    neighbour spreads the batch over the sphere. From "DINOv2: Learning Robust Visual Features
    without Supervision" (Oquab et al., TMLR 2024), after "Spreading vectors for similarity search"
    (Sablayrolles et al., ICLR 2019). As in the official code (``KoLeoLoss``) the nearest neighbour is
    the one of largest inner product, the distance is ``F.pairwise_distance`` (which adds
    :math:`\epsilon = 10^{-8}` to the difference) and :math:`\epsilon` is added inside the log.

    Args:
        embeddings: ``[B, D]`` with B >= 2.

    Returns:
        A scalar.

    Example:
        >>> import torch
        >>> koleo_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # -log sqrt(2)
        tensor(-0.3466)
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"KoLeo needs embeddings [B, D] with B >= 2; got shape {list(embeddings.shape)}")
    x = F.normalize(embeddings.to(compute_dtype(embeddings)), dim=-1, eps=KOLEO_EPS)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)  # below any cosine: a point is never its own neighbour
        nearest = dots.argmax(1)
    rho = F.pairwise_distance(x, x[nearest], p=2.0, eps=KOLEO_EPS)
    return -torch.log(rho + KOLEO_EPS).mean()


__all__ = [
    "byol_loss",
    "data2vec_loss",
    "data2vec_targets",
    "dino_loss",
    "dino_target_entropies",
    "ibot_patch_loss",
    "koleo_loss",
    "update_center",
]
