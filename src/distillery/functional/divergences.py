"""Divergences between the teacher's and the student's class (or token) distributions."""

from __future__ import annotations

from torch import Tensor

from distillery.functional._fused import fused_rows
from distillery.functional._rows import (
    align_vocab,
    check_reduction,
    check_temperature,
    check_unit_interval,
    flatten_rows,
    kl_rows,
    log_probs,
    mix_log_probs,
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
    per_row = fused_rows("forward_kl", s, t, temperature)
    if per_row is None:
        per_row = kl_rows(log_probs(t, temperature), log_probs(s, temperature)) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Reverse KL divergence from the student to the teacher, scaled by :math:`T^2`.

    .. math::

        \mathcal{L} = T^2 \, \mathrm{KL}(p_s \,\|\, p_t)
                    = T^2 \sum_c p_s(c) \left(\log p_s(c) - \log p_t(c)\right),
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    Reverse KL is mode-seeking: the student is penalised for putting mass where the teacher has
    little, and may ignore some of the teacher's modes ("MiniLLM: Knowledge Distillation of Large
    Language Models" argues for it when distilling generative language models).

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape).
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> reverse_kl(s, t)
        tensor(0.3354)
        >>> reverse_kl(s, t, temperature=4.0, reduction="none")
        tensor([0.3739, 0.4889])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    per_row = fused_rows("reverse_kl", s, t, temperature)
    if per_row is None:
        per_row = kl_rows(log_probs(s, temperature), log_probs(t, temperature)) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence :math:`\mathrm{JSD}(\beta)`, scaled by :math:`T^2`.

    For :math:`0 < \beta < 1`:

    .. math::

        \mathcal{L} = T^2 \left[\beta \, \mathrm{KL}(p_t \,\|\, m)
                     + (1 - \beta) \, \mathrm{KL}(p_s \,\|\, m)\right],
        \quad m = \beta \, p_t + (1 - \beta) \, p_s,
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    from "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (Agarwal
    et al., GKD); :math:`\beta = 0.5` is the symmetric Jensen-Shannon divergence. The mixture's
    log-probabilities are computed with ``logaddexp`` of :math:`\log\beta + \log p_t` and
    :math:`\log(1-\beta) + \log p_s`. The value is symmetric under swapping student and teacher
    together with :math:`\beta \to 1 - \beta`, and at :math:`T = 1` it is bounded by the binary
    entropy :math:`-\beta\ln\beta - (1-\beta)\ln(1-\beta)`.

    **The ends are special-cased**, as GKD and TRL's ``generalized_jsd_loss`` do: the formula above
    tends to 0 as :math:`\beta \to 0` or :math:`\beta \to 1`, but ``beta=0`` returns exactly
    :func:`forward_kl` :math:`T^2\,\mathrm{KL}(p_t \,\|\, p_s)` and ``beta=1`` returns exactly
    :func:`reverse_kl` :math:`T^2\,\mathrm{KL}(p_s \,\|\, p_t)`. So the function is
    discontinuous at both ends: a small ``beta`` such as 0.01 is *not* close to forward KL.

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape).
        beta: mixture weight :math:`\beta \in [0, 1]` of the teacher (see the ends above).
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> generalized_jsd(s, t)
        tensor(0.0751)
        >>> generalized_jsd(s, t, beta=0.9, temperature=2.0, reduction="none")
        tensor([0.0321, 0.0438])
        >>> bool(generalized_jsd(s, t, beta=0.0) == forward_kl(s, t))
        True
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    check_unit_interval("beta", beta)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    per_row = fused_rows(kind, s, t, temperature, beta)
    if per_row is not None:
        return reduce_rows(per_row, index, lead, reduction, num_valid)
    log_ps, log_pt = log_probs(s, temperature), log_probs(t, temperature)  # (N, C)
    if beta == 0.0:
        per_row = kl_rows(log_pt, log_ps)
    elif beta == 1.0:
        per_row = kl_rows(log_ps, log_pt)
    else:
        log_m = mix_log_probs(log_pt, log_ps, beta)  # (N, C)
        per_row = beta * kl_rows(log_pt, log_m) + (1.0 - beta) * kl_rows(log_ps, log_m)
    return reduce_rows(per_row * temperature**2, index, lead, reduction, num_valid)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Total variation distance between the teacher and the student, scaled by :math:`T^2`.

    .. math::

        \mathcal{L} = T^2 \, \frac{1}{2} \sum_c \left| p_t(c) - p_s(c) \right|,
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    Symmetric and bounded: each row lies in :math:`[0, T^2]`. The :math:`T^2` factor follows the
    shared convention of the divergences; note that total variation is first order in the logit
    difference (KL is second order), so at large :math:`T` its gradient grows roughly like
    :math:`T` rather than staying constant.

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape).
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> total_variation(s, t)
        tensor(0.3483)
        >>> total_variation(s, t, temperature=4.0, reduction="none")
        tensor([1.6507, 1.9715])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    p_s, p_t = log_probs(s, temperature).exp(), log_probs(t, temperature).exp()  # (N, C)
    per_row = 0.5 * (p_t - p_s).abs().sum(-1) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Skew (forward) KL divergence: the teacher against a teacher-student mixture, scaled by :math:`T^2`.

    .. math::

        \mathcal{L} = T^2 \, \mathrm{KL}\!\left(p_t \,\|\, \alpha \, p_t + (1 - \alpha)\, p_s\right),
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    from "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al.). Mixing
    some teacher mass into the student side bounds the divergence by :math:`T^2 \log(1/\alpha)`
    and keeps its gradient finite where the student puts almost no mass. ``alpha=0`` is exactly
    :func:`forward_kl`; ``alpha=1`` gives 0.

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape).
        alpha: skew :math:`\alpha \in [0, 1]`, the teacher's share of the mixture.
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> skew_kl(s, t)
        tensor(0.2395)
        >>> skew_kl(s, t, alpha=0.5, temperature=2.0, reduction="none")
        tensor([0.0887, 0.1213])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    check_unit_interval("alpha", alpha)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    per_row = fused_rows("forward_kl" if alpha == 0.0 else "skew_kl", s, t, temperature, alpha)
    if per_row is None:
        log_ps, log_pt = log_probs(s, temperature), log_probs(t, temperature)  # (N, C)
        per_row = kl_rows(log_pt, mix_log_probs(log_pt, log_ps, alpha)) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Skew reverse KL divergence: the student against a student-teacher mixture, scaled by :math:`T^2`.

    .. math::

        \mathcal{L} = T^2 \, \mathrm{KL}\!\left(p_s \,\|\, \alpha \, p_s + (1 - \alpha)\, p_t\right),
        \quad p_t = \mathrm{softmax}(t / T),\ p_s = \mathrm{softmax}(s / T)

    from "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al.), the
    mode-seeking counterpart of :func:`skew_kl`. ``alpha=0`` is exactly :func:`reverse_kl`;
    ``alpha=1`` gives 0.

    Args:
        student_logits: ``[..., C]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., C]`` teacher logits (the same leading shape).
        alpha: skew :math:`\alpha \in [0, 1]`, the student's share of the mixture.
        temperature: softening temperature :math:`T > 0` applied to both sides.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> skew_reverse_kl(s, t)
        tensor(0.2541)
        >>> skew_reverse_kl(s, t, alpha=0.5, temperature=2.0, reduction="none")
        tensor([0.0896, 0.1156])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    check_unit_interval("alpha", alpha)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits, mask)
    per_row = fused_rows("reverse_kl" if alpha == 0.0 else "skew_reverse_kl", s, t, temperature, alpha)
    if per_row is None:
        log_ps, log_pt = log_probs(s, temperature), log_probs(t, temperature)  # (N, C)
        per_row = kl_rows(log_ps, mix_log_probs(log_ps, log_pt, alpha)) * temperature**2
    return reduce_rows(per_row, index, lead, reduction, num_valid)
