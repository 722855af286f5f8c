r"""Several teachers, one target: per-row member weights, the combined distribution, agreement.

K teachers ("members") give logits ``[K, ..., C]`` for the same rows (``[B, C]`` for classifiers,
``[B, L, V]`` for language models). :func:`combine_teachers` turns them into

* ``logits`` ``[..., C]``: the log of the combined probabilities
  :math:`\log \sum_k w_{k,i}\, p_k(\cdot \mid x_i)`, computed as a log-sum-exp of log-softmaxes
  (never a log of a sum of probabilities), so it stands wherever one teacher's logits do;
* ``weights`` ``[K, ...]``: each member's weight on each row, summing to 1 over the members
  (0 for a member dropped this step);
* ``keep`` ``[...]``: the rows the student should learn from (every row, except for ``agreement``).

The rules (``combine``), with :math:`p_{k,i}` member k's softmax on row i and :math:`m_k \in \{0, 1\}`
whether member k takes part this step (teacher dropping, :func:`drop_members`):

* ``mean``: :math:`w_{k,i} = m_k / \sum_j m_j`;
* ``weighted``: fixed weights :math:`a_k \ge 0`, :math:`w_{k,i} = a_k m_k / \sum_j a_j m_j`;
* ``confidence``: per-row weights, a softmax over the members taking part of a confidence score
  :math:`s_{k,i}` at temperature :math:`\tau`:
  :math:`w_{k,i} = m_k e^{s_{k,i}/\tau} / \sum_j m_j e^{s_{j,i}/\tau}`, with
  :math:`s_{k,i} = -H(p_{k,i}) = \sum_c p_{k,i}(c) \log p_{k,i}(c)` (``confidence="entropy"``: a
  sure member counts more; no label needed) or :math:`s_{k,i} = \log p_{k,i}(y_i)` (``"label"``:
  the member that gives the label more probability counts more, i.e. a softmax of the members'
  negative cross-entropies; rows without a label, ``y_i = ignore_index``, fall back to the entropy
  score). Choosing per example how much each teacher counts is the idea of "Reinforced
  Multi-Teacher Selection for Knowledge Distillation" (Yuan et al., AAAI 2021), where a policy
  trained by reinforcement learning selects each example's teachers from features of the example
  and of the teachers' predictions; here a fixed rule of the teachers' confidence replaces the
  learned policy.
* ``agreement``: the weights of ``mean``, and ``keep`` marks the rows where every member taking
  part has the same top-1 class: the multi-teacher agreement filter of "UniSD: Towards a Unified
  Self-Distillation Framework for Large Language Models" (Jin et al., 2026), which trains only
  on the supervision the teachers concur on.

Teacher dropping follows "UNIC: Universal Classification Models via Multi-teacher Distillation"
(Sariyildiz et al., ECCV 2024), which drops teachers from the loss at random during training so
that no single teacher dominates; :func:`drop_members` draws the members left out of a step
uniformly (a fixed number, or each with a probability), and the rules above renormalise over the
members that remain.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from distillery.functional._rows import LOG_FLOOR, compute_dtype

COMBINES = ("mean", "weighted", "confidence", "agreement")
CONFIDENCES = ("entropy", "label")


class MultiTeacherTarget(NamedTuple):
    """What :func:`combine_teachers` returns (shapes for member logits ``[K, ..., C]``)."""

    logits: Tensor  # [..., C]: log of the combined probabilities
    weights: Tensor  # [K, ...]: each member's weight per row, summing to 1 over K
    keep: Tensor  # [...] bool: the rows to learn from (all True unless combine="agreement")


def _members_mask(members: Tensor | None, k: int, device: torch.device) -> Tensor:
    if members is None:
        return torch.ones(k, dtype=torch.bool, device=device)
    members = members.to(device=device, dtype=torch.bool)
    if members.shape != (k,):
        raise ValueError(f"members must be a [K] = [{k}] boolean vector; got shape {tuple(members.shape)}")
    if not bool(members.any()):
        raise ValueError("members keeps no member: at least one teacher must take part in a step")
    return members


def _check_logits(member_logits: Tensor) -> None:
    if member_logits.dim() < 2:
        raise ValueError(
            f"member_logits must be [K, ..., C] (K members' logits); got shape {tuple(member_logits.shape)}"
        )
    if member_logits.shape[0] < 1:
        raise ValueError("member_logits holds no member (K = 0)")


def member_entropy(log_p: Tensor) -> Tensor:
    r"""Entropy :math:`H(p) = -\sum_c p_c \log p_c` of each row of log-probabilities ``[..., C]``;
    classes without mass (``-inf``, padded vocabulary slots) contribute 0."""
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(log_p)).sum(-1)


def member_weights(
    member_logits: Tensor,
    combine: str = "mean",
    *,
    weights: Tensor | None = None,
    confidence: str = "entropy",
    temperature: float = 1.0,
    target: Tensor | None = None,
    members: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Each member's weight on each row, ``[K, ...]`` (see the module docstring for the rules).

    Args:
        member_logits: ``[K, ..., C]`` logits of K members on the same rows.
        combine: ``mean``, ``weighted``, ``confidence`` or ``agreement`` (weighs as ``mean``).
        weights: ``[K]`` non-negative fixed weights (``weighted`` only); normalised here over the
            members taking part.
        confidence: ``entropy`` or ``label`` (``confidence`` only).
        temperature: :math:`\tau` of the confidence softmax (> 0; small: the most confident member
            takes nearly all the weight, large: close to the mean).
        target: ``[...]`` labels (``confidence="label"``); ``ignore_index`` marks rows without one.
        members: ``[K]`` boolean, the members taking part this step (default: all).
        ignore_index: the label of rows without one.

    Example:
        >>> import torch
        >>> z = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]])  # member 1 is sure, member 2 is not
        >>> member_weights(z, "confidence", confidence="entropy").squeeze(-1)
        tensor([0.6464, 0.3536])
        >>> member_weights(z, "weighted", weights=torch.tensor([3.0, 1.0])).squeeze(-1)
        tensor([0.7500, 0.2500])
    """
    _check_logits(member_logits)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {combine!r}")
    k, lead = member_logits.shape[0], member_logits.shape[1:-1]
    dtype = compute_dtype(member_logits)
    device = member_logits.device
    active = _members_mask(members, k, device)
    view = (k,) + (1,) * len(lead)
    if combine in ("mean", "agreement"):
        w = active.to(dtype) / active.sum().to(dtype)
        return w.reshape(view).expand(k, *lead).clone()
    if combine == "weighted":
        if weights is None:
            raise ValueError('combine="weighted" needs weights, one non-negative number per member')
        a = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
        if a.shape != (k,):
            raise ValueError(f"weights has {a.numel()} entries for {k} members; give one per member")
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError(f"weights must be finite and >= 0; got {a.tolist()}")
        a = a * active.to(dtype)
        total = a.sum()
        if not total > 0:
            raise ValueError("the weights of the members taking part this step sum to 0")
        return (a / total).reshape(view).expand(k, *lead).clone()
    # confidence
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}; got {confidence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    log_p = torch.log_softmax(member_logits.to(dtype), dim=-1)  # [K, ..., C]
    score = -member_entropy(log_p)  # [K, ...]
    if confidence == "label":
        if target is None:
            raise ValueError('confidence="label" needs the rows\' labels (target)')
        if target.shape != lead:
            raise ValueError(
                f"target has shape {tuple(target.shape)}; expected the logits' leading shape {tuple(lead)}"
            )
        target = target.to(device)
        labelled = target != ignore_index
        safe = torch.where(labelled, target, torch.zeros_like(target)).long()
        if safe.numel() and bool(((safe < 0) | (safe >= member_logits.shape[-1])).any()):
            raise ValueError(
                f"target holds a class outside [0, {member_logits.shape[-1]}); rows without a label must "
                f"equal ignore_index ({ignore_index})"
            )
        log_py = log_p.gather(-1, safe.unsqueeze(0).expand(k, *lead).unsqueeze(-1)).squeeze(-1)
        score = torch.where(labelled.unsqueeze(0), log_py, score)
    # floored so that a row where every member gives the label no mass is uniform, not NaN
    score = (score / temperature).clamp_min(LOG_FLOOR)
    score = score.masked_fill(~active.reshape(view), float("-inf"))
    return torch.softmax(score, dim=0)


def agreement_mask(member_logits: Tensor, members: Tensor | None = None) -> Tensor:
    """``[...]`` boolean: the rows where every member taking part has the same top-1 class.

    Args:
        member_logits: ``[K, ..., C]``.
        members: ``[K]`` boolean, the members taking part (default: all); with one member every row
            agrees.

    Example:
        >>> import torch
        >>> z = torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
        >>> agreement_mask(z)
        tensor([ True, False])
    """
    _check_logits(member_logits)
    k = member_logits.shape[0]
    active = _members_mask(members, k, member_logits.device)
    top = member_logits.argmax(dim=-1)  # [K, ...]
    ref = top[int(active.nonzero()[0])]
    view = (k,) + (1,) * (top.dim() - 1)
    return ((top == ref.unsqueeze(0)) | ~active.reshape(view)).all(dim=0)


def combine_teachers(
    member_logits: Tensor,
    combine: str = "mean",
    *,
    weights: Tensor | None = None,
    confidence: str = "entropy",
    temperature: float = 1.0,
    target: Tensor | None = None,
    members: Tensor | None = None,
    ignore_index: int = -100,
) -> MultiTeacherTarget:
    r"""Several teachers' logits combined into one target (see the module docstring).

    .. math::

        z_i = \log \sum_k w_{k,i}\, \mathrm{softmax}(z_{k,i}), \qquad \sum_k w_{k,i} = 1

    computed as :math:`\mathrm{logsumexp}_k(\log w_{k,i} + \log \mathrm{softmax}(z_{k,i}))`: exact and
    finite for large logits (a member with weight 0 adds nothing). Computed in float32 (float64
    stays float64); no gradient is needed on the teacher side, but none is blocked either.

    Args:
        member_logits: ``[K, ..., C]`` logits of K members on the same rows (``[K, B, C]`` for
            classifiers, ``[K, B, L, V]`` for language models).
        combine, weights, confidence, temperature, target, members, ignore_index: see
            :func:`member_weights`.

    Returns:
        :class:`MultiTeacherTarget` ``(logits [..., C], weights [K, ...], keep [...])``.

    Example:
        >>> import torch
        >>> z = torch.log(torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.7, 0.3], [0.2, 0.8]]]))
        >>> out = combine_teachers(z, "agreement")
        >>> out.logits.softmax(-1)  # the mean of the two members on both rows
        tensor([[0.8000, 0.2000],
                [0.4000, 0.6000]])
        >>> out.keep  # row 1: both members pick class 0; row 2: class 0 against class 1
        tensor([ True, False])
        >>> out = combine_teachers(z, "confidence", confidence="label", target=torch.tensor([0, 1]))
        >>> out.weights.T  # softmax over the members of log p_k(y): proportional to p_k(y)
        tensor([[0.5625, 0.4375],
                [0.3333, 0.6667]])
    """
    w = member_weights(
        member_logits,
        combine,
        weights=weights,
        confidence=confidence,
        temperature=temperature,
        target=target,
        members=members,
        ignore_index=ignore_index,
    )
    dtype = compute_dtype(member_logits)
    log_p = torch.log_softmax(member_logits.to(dtype), dim=-1)
    log_w = w.log()  # -inf for a member without weight: it adds nothing to the log-sum-exp
    logits = torch.logsumexp(log_p + log_w.unsqueeze(-1), dim=0)
    if combine == "agreement":
        keep = agreement_mask(member_logits, members)
    else:
        keep = torch.ones(member_logits.shape[1:-1], dtype=torch.bool, device=member_logits.device)
    return MultiTeacherTarget(logits, w, keep)


def drop_members(num_members: int, drop: float, generator: torch.Generator | None = None) -> Tensor:
    """Which members take part in a step: ``[K]`` boolean, True = kept (teacher dropping, UNIC).

    Args:
        num_members: K.
        drop: an integer ``n`` (``0 <= n < K``): exactly n members, drawn uniformly, are dropped; or
            a probability ``0 <= p < 1`` (a float): each member is dropped independently with
            probability p, and when that would drop them all, one member drawn uniformly is kept.
        generator: the random source (a seeded one makes the draw reproducible).

    Example:
        >>> import torch
        >>> keep = drop_members(4, 1, torch.Generator().manual_seed(0))
        >>> int(keep.sum()), keep.dtype
        (3, torch.bool)
        >>> drop_members(3, 0).tolist()
        [True, True, True]
    """
    k = int(num_members)
    if k < 1:
        raise ValueError(f"num_members must be >= 1; got {num_members}")
    if isinstance(drop, bool):
        raise ValueError(f"drop must be a number of members or a probability; got {drop!r}")
    if isinstance(drop, int):
        if not 0 <= drop < k:
            raise ValueError(f"drop={drop} members of {k}: drop between 0 and {k - 1} (one member must stay)")
        keep = torch.ones(k, dtype=torch.bool)
        if drop:
            keep[torch.randperm(k, generator=generator)[:drop]] = False
        return keep
    p = float(drop)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop={drop}: a probability must lie in [0, 1)")
    keep = torch.rand(k, generator=generator) >= p
    if not bool(keep.any()):
        keep[int(torch.randint(k, (1,), generator=generator))] = True
    return keep


__all__ = [
    "COMBINES",
    "CONFIDENCES",
    "MultiTeacherTarget",
    "agreement_mask",
    "combine_teachers",
    "drop_members",
    "member_entropy",
    "member_weights",
]
