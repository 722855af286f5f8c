r"""Sampled-token reverse KL with an importance weight, for tokens drawn by an older policy.

In on-policy (self-)distillation the student samples its own rollouts and is pulled towards a
teacher's distribution on them, :math:`\mathrm{KL}(\pi_\theta \,\|\, \pi_T)` per token. When only the
sampled token's log-probability is used, two things go wrong unless they are handled:

* the tokens were drawn by a *behaviour* policy :math:`\pi_b` (the student's weights when it
  generated, several optimizer steps old), not by :math:`\pi_\theta`;
* the expectation is over the student's own distribution, so the gradient has a score-function
  part: the naive surrogate :math:`\log \pi_\theta(y) - \log \pi_T(y)` with :math:`y` held fixed has
  an expected gradient of 0 (:math:`E_{y \sim \pi_\theta}[\nabla \log \pi_\theta(y)] = 0`), and the
  naive k3 surrogate's expected gradient is that of the *forward* KL.

:func:`importance_weighted_reverse_kl` fixes both with a differentiable importance weight, as in
"Skill-SD: Skill-Conditioned Self-Distillation for Multi-turn LLM Agents" (Wang et al., 2026).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distillery.functional._rows import (
    LOG_FLOOR,
    check_reduction,
    flatten_rows,
    reduce_rows,
)

ESTIMATORS = ("k3", "k1")


def importance_weighted_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    behaviour_logp: Tensor,
    *,
    estimator: str = "k3",
    clip: float | None = 2.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Importance-weighted sampled-token estimate of :math:`\mathrm{KL}(\pi_\theta \,\|\, \pi_T)`.

    From "Skill-SD: Skill-Conditioned Self-Distillation for Multi-turn LLM Agents" (Wang et al.,
    2026). Each row's token :math:`y` was sampled from a behaviour policy :math:`\pi_b` (an older copy
    of the student) whose log-probability :math:`\log \pi_b(y)` was recorded. With
    :math:`\pi_\theta = \mathrm{softmax}(s)`, :math:`\pi_T = \mathrm{softmax}(t)`, the log-ratio
    :math:`\ell = \log \pi_\theta(y) - \log \pi_T(y)` and the importance ratio
    :math:`\rho = \pi_\theta(y) / \pi_b(y)`, the per-token value is

    .. math::

        \mathcal{L} = w \cdot k(\ell), \qquad
        k_3(\ell) = e^{-\ell} - 1 + \ell \ \ (\text{default}), \qquad k_1(\ell) = \ell,
        \qquad w = \min(\rho, c)

    where the weight :math:`w` carries the gradient of :math:`\rho` (it is never detached):
    :math:`\nabla w = w \, \nabla \log \pi_\theta(y)`. Unclipped (:math:`\rho \le c`) that is exactly
    :math:`\nabla \rho`, and

    .. math::

        E_{y \sim \pi_b}[\rho\, k_3(\ell)] = \sum_y \left(\pi_T(y) - \pi_\theta(y)
            + \pi_\theta(y)\, \ell(y)\right) = \mathrm{KL}(\pi_\theta \,\|\, \pi_T),
        \qquad
        E_{y \sim \pi_b}[\nabla(\rho\, k_3(\ell))] = \nabla \mathrm{KL}(\pi_\theta \,\|\, \pi_T)

    (the same holds for :math:`k_1`): both the value and the gradient are unbiased, which is what the
    paper calls gradient-correct. The per-sample gradient is
    :math:`w\, \ell\, \nabla \log \pi_\theta(y)` for :math:`k_3` (the score-function estimator with
    the baseline :math:`-1` folded in) and :math:`w\,(\ell + 1)\, \nabla \log \pi_\theta(y)` for
    :math:`k_1`. When the behaviour policy is the student itself (:math:`\pi_b = \pi_\theta`, e.g.
    ``behaviour_logp`` computed from the same logits), :math:`w = 1` and the value is the plain
    sampled estimate :math:`k(\ell)`, but the gradient still has the score-function part that the
    plain estimate lacks. The teacher is detached.

    **What the paper gives, and what this function adds.** The paper's self-distillation loss is
    the importance ratio times the k3 estimator of the log-ratio between the student and the
    skill-conditioned teacher at the sampled token, averaged over tokens, with the teacher synchronised
    to the student. The paper's own text was not at hand: this form is taken from secondary accounts of
    it (which also relate it to DeepSeek-V3.2's "unbiased KL estimate", the ratio to the old policy
    times k3), and its gradient-correctness is checked here by the derivation above and by the tests.
    Whether and how the paper clips :math:`\rho` was not found. The clipping here is this function's
    choice: truncated importance sampling that caps the weight's *value* at ``clip`` while keeping
    its gradient the score-function direction (:math:`\nabla w = w \nabla \log \pi_\theta`), so that
    a clipped token contributes :math:`c\, \ell\, \nabla \log \pi_\theta(y)`. Clamping :math:`\rho`
    with ``torch.clamp`` instead would cut the gradient through :math:`\rho` on clipped tokens and
    leave :math:`c\, \nabla k_3`, the forward-KL direction. Clipping biases the estimate where
    :math:`\rho > c` and bounds its variance; ``clip=None`` keeps it unbiased. The default cap 2 is a
    common one for truncated importance sampling of language-model policies. ``estimator="k1"`` is
    the plain log-ratio with the same weight. The weight :math:`\lambda` of the term belongs to the
    loss term.

    Args:
        student_logits: ``[..., V]`` the current student's logits at the sampled positions; leading
            dims of any rank are flattened into rows.
        teacher_logits: ``[..., V]`` the teacher's logits (same shape). Detached.
        tokens: ``[...]`` integer ids of the sampled tokens :math:`y`, in ``[0, V)``.
        behaviour_logp: ``[...]`` :math:`\log \pi_b(y)`, the behaviour policy's log-probabilities of
            those tokens when they were sampled (no gradient).
        estimator: ``"k3"`` (the paper's, default) or ``"k1"``.
        clip: cap :math:`c \ge 1` of the importance weight, or None for none.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
        >>> y = torch.tensor([0, 2])
        >>> old = torch.tensor([-0.4, -1.0])  # log pi_b(y) when the tokens were sampled
        >>> importance_weighted_reverse_kl(s, t, y, old)
        tensor(0.3108)
        >>> importance_weighted_reverse_kl(s, t, y, old, estimator="k1", clip=None, reduction="none")
        tensor([0.7274, 0.8892])
    """
    check_reduction(reduction)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if clip is not None and not clip >= 1.0:
        raise ValueError(f"clip must be >= 1 (a cap on the importance weight; None for no cap); got {clip!r}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape (the same rows and vocabulary)"
        )
    lead = student_logits.shape[:-1]
    for name, x in (("tokens", tokens), ("behaviour_logp", behaviour_logp)):
        if x.shape != lead:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected the logits' leading shape {tuple(lead)} "
                "(one value per sampled token)"
            )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids; got dtype {tokens.dtype}")
    if not behaviour_logp.is_floating_point():
        raise ValueError(f"behaviour_logp must be a floating-point tensor; got dtype {behaviour_logp.dtype}")
    s, t, y, index, lead = flatten_rows(student_logits, teacher_logits.detach(), mask, target=tokens)
    y = y.long()
    if y.numel() and bool(((y < 0) | (y >= s.shape[-1])).any()):  # checked on the valid rows only
        bad = y[(y < 0) | (y >= s.shape[-1])][0].item()
        raise ValueError(f"tokens holds id {bad}, outside [0, {s.shape[-1]}) (the vocabulary)")
    y = y.unsqueeze(-1)  # (N, 1)
    old = behaviour_logp.detach().reshape(-1).to(s.dtype)
    if index is not None:
        old = old.index_select(0, index)
    logp = torch.log_softmax(s, dim=-1).gather(-1, y).squeeze(-1)  # (N,) log pi_theta(y)
    # Where the teacher gives the sampled token no mass, its log-probability is floored (finite values).
    logp_teacher = torch.log_softmax(t, dim=-1).gather(-1, y).squeeze(-1).clamp_min(LOG_FLOOR)
    log_ratio = logp - logp_teacher  # (N,) ell
    log_w = (logp - old).detach()
    if clip is not None:
        log_w = log_w.clamp_max(math.log(clip))
    # Value min(rho, c); gradient min(rho, c) * grad log pi_theta(y) (= grad rho where unclipped).
    weight = torch.exp(log_w + (logp - logp.detach()))
    value = log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio
    return reduce_rows(weight * value, index, lead, reduction, num_valid)


def sampled_logp(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    r"""The detached log-probability of each row's token under ``softmax(logits / temperature)``:
    the behaviour log-probabilities of tokens the model itself sampled at ``temperature``.

    .. math::

        \log \pi_b(y) = z_y / T - \log \sum_j e^{z_j / T}

    Args:
        logits: ``[..., V]``.
        tokens: ``[...]`` token ids (negative ids are read as 0; mask those rows in the loss).
        temperature: the sampling temperature.

    Example:
        >>> import torch
        >>> sampled_logp(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).exp()
        tensor([0.5000])
    """
    logp = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
    return logp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)
