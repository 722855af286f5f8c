"""Self-attention distillation for Transformers: attention distributions, scores and relations.

All functions take per-head tensors of a batch of ``B`` sequences of length ``L`` and an optional
``mask`` ``[B, L]`` (True = a real token, False = padding). Padding never contributes: the query
rows of padding tokens are dropped and their key columns are excluded (distributions are
renormalised over the valid keys where the function builds or receives them). Reductions:

* ``"mean"``: the average over the valid rows (``(batch, head, query)`` triples; for
  :func:`attention_score_mse` the valid ``(batch, head, query, key)`` entries). With no valid row
  the result is 0 with a zero gradient.
* ``"sum"``: the sum over them.
* ``"none"``: the per-row (per-entry) values with zeros at padding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distillery.functional._rows import check_reduction, compute_dtype, kl_rows

# Probabilities are floored here before their log (an underflowed student probability where the
# teacher has mass), and row sums before renormalising.
PROB_EPS = 1.0e-12


def attention_kl(
    student_probs: Tensor,
    teacher_probs: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = PROB_EPS,
) -> Tensor:
    r"""MiniLM's self-attention distribution transfer: KL(teacher || student) per attention row.

    .. math::

        \mathcal{L} = \frac{1}{A \, |x|} \sum_{a=1}^{A} \sum_{i=1}^{|x|}
            \sum_{j} p^t_{a,i,j} \left( \log p^t_{a,i,j} - \log \max(p^s_{a,i,j}, \epsilon) \right)

    summed over the keys ``j`` and averaged over the heads and the valid query rows ``i`` of the
    batch, where :math:`p_{a,i,\cdot}` is head ``a``'s attention distribution of query ``i``. From
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers" (Wang et al., NeurIPS 2020), applied to the last layer of both models; it needs
    the same number of heads on both sides (the hidden sizes may differ).

    With a ``mask``, the key columns of padding are dropped from both sides and each row is
    renormalised over the valid keys before the KL (attention computed with an additive padding
    mask already puts ~0 mass there, so this is a no-op up to rounding); query rows of padding
    are dropped. Without a mask the rows are used as given. Keys where the teacher has no mass
    contribute 0.

    Args:
        student_probs: ``[B, A, L, L]`` student attention probabilities (rows sum to 1 over the keys).
        teacher_probs: ``[B, A, L, L]`` teacher attention probabilities (the same shape).
        mask: optional ``[B, L]`` boolean; False marks padding tokens.
        reduction: ``"mean"`` over valid ``(batch, head, query)`` rows, ``"sum"``, or ``"none"``
            (``[B, A, L]``, 0 at padding queries).
        eps: floor on the student's probabilities before the log, and on row sums when
            renormalising.

    Returns:
        A scalar, or ``[B, A, L]`` with ``reduction="none"``. Computed in float32 (float64 inputs
        stay float64).

    Example:
        >>> import torch
        >>> t = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])  # [B=1, A=1, L=2, L=2]
        >>> s = torch.tensor([[[[0.8, 0.2], [0.9, 0.1]]]])
        >>> attention_kl(s, t, reduction="none")  # row 0: 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
        tensor([[[0.2231, 0.0000]]])
        >>> attention_kl(s, t)
        tensor(0.1116)
    """
    check_reduction(reduction)
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    batch, _, length = _check_attention_pair(student_probs, teacher_probs, "attention probabilities")
    token_mask = _check_token_mask(mask, batch, length)
    dtype = compute_dtype(student_probs)
    s = _query_rows(student_probs.to(dtype))  # (B*L, A, L)
    t = _query_rows(teacher_probs.to(dtype))  # (B*L, A, L)
    index = None
    if token_mask is not None:
        index = token_mask.reshape(-1).nonzero().squeeze(-1)
        keys = _key_mask_rows(token_mask, index)  # (N, 1, L)
        s = _renormalise(s.index_select(0, index).masked_fill(~keys, 0.0), eps)  # (N, A, L)
        t = _renormalise(t.index_select(0, index).masked_fill(~keys, 0.0), eps)  # (N, A, L)
    has_mass = t > 0
    # Select before the log: 0 * log(0) would poison the backward pass with NaN.
    log_t = torch.log(torch.where(has_mass, t, torch.ones_like(t)))
    log_s = torch.log(s.clamp_min(eps))
    per_row = torch.where(has_mass, t * (log_t - log_s), torch.zeros_like(t)).sum(-1)  # (N, A)
    return _reduce_query_rows(per_row, index, batch, length, reduction)


def self_relation_kl(
    student_states: Tensor,
    teacher_states: Tensor,
    *,
    num_relation_heads: int,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""MiniLMv2's self-attention relation transfer: KL between scaled dot-product relations.

    Each side's states :math:`X \in \mathbb{R}^{L \times D}` (queries, keys or values of one layer,
    heads concatenated) are split along D into :math:`R` relation heads of size
    :math:`d_r = D / R`, and

    .. math::

        \mathrm{Rel}_r = \mathrm{softmax}\!\left( \frac{X_r X_r^\top}{\sqrt{d_r}} \right), \qquad
        \mathcal{L} = \frac{1}{R \, |x|} \sum_{r=1}^{R} \sum_{i=1}^{|x|}
            \mathrm{KL}\!\left( \mathrm{Rel}^t_{r,i} \,\|\, \mathrm{Rel}^s_{r,i} \right)

    (softmax over the keys; KL summed over the keys, averaged over the relation heads and the valid
    query rows ``i``). From "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
    Compressing Pretrained Transformers" (Wang et al., Findings of ACL 2021), which uses the
    query-query, key-key and value-value relations. The number of relation heads is free of the
    models' head counts, and the student's D may differ from the teacher's (each side uses its own
    :math:`d_r`), so no projection is needed. Padding keys get :math:`-\infty` before the softmax;
    padding queries are dropped.

    With :math:`R` = the models' attention-head count and :math:`X` = the values, this is MiniLM's
    value-relation transfer :math:`\mathrm{softmax}(V_a V_a^\top / \sqrt{d_k})` ("MiniLM: Deep
    Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", Wang et
    al., NeurIPS 2020); see :func:`value_relation_kl`.

    Args:
        student_states: ``[B, L, D_s]`` student queries, keys or values (heads concatenated in the
            order the model splits them, as the output of its projection).
        teacher_states: ``[B, L, D_t]`` the teacher's counterpart (the same B and L).
        num_relation_heads: :math:`R`; must divide both ``D_s`` and ``D_t``.
        mask: optional ``[B, L]`` boolean; False marks padding tokens.
        reduction: ``"mean"`` over valid ``(batch, relation head, query)`` rows, ``"sum"``, or
            ``"none"`` (``[B, R, L]``, 0 at padding queries).

    Returns:
        A scalar, or ``[B, R, L]`` with ``reduction="none"``. Computed in float32 (float64 inputs
        stay float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, L=2, D_s=2]
        >>> t = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])  # D_t=4
        >>> # relations: student rows softmax(1/sqrt(2), 0), teacher rows softmax(2, 0)
        >>> self_relation_kl(s, t, num_relation_heads=1)
        tensor(0.1198)
        >>> self_relation_kl(s, t, num_relation_heads=2, reduction="none").shape
        torch.Size([1, 2, 2])
    """
    check_reduction(reduction)
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int):
        raise ValueError(f"num_relation_heads must be a positive int; got {num_relation_heads!r}")
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be >= 1; got {num_relation_heads}")
    for side, x in (("student", student_states), ("teacher", teacher_states)):
        if x.dim() != 3:
            raise ValueError(f"{side} states must be [B, L, D]; got {tuple(x.shape)}")
        if x.shape[-1] % num_relation_heads != 0:
            raise ValueError(
                f"the {side}'s width D={x.shape[-1]} (states {tuple(x.shape)}) is not divisible by "
                f"num_relation_heads={num_relation_heads}; choose a head count that divides both "
                f"D_s={student_states.shape[-1]} and D_t={teacher_states.shape[-1]}"
            )
    if student_states.shape[:2] != teacher_states.shape[:2]:
        raise ValueError(
            f"student states {tuple(student_states.shape)} and teacher states "
            f"{tuple(teacher_states.shape)} differ in their batch size or sequence length [B, L]"
        )
    batch, length = student_states.shape[0], student_states.shape[1]
    token_mask = _check_token_mask(mask, batch, length)
    dtype = compute_dtype(student_states)
    index = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(-1)
    log_s = _relation_log_probs(student_states.to(dtype), num_relation_heads, token_mask, index)
    log_t = _relation_log_probs(teacher_states.to(dtype), num_relation_heads, token_mask, index)
    per_row = kl_rows(log_t, log_s)  # (N, R)
    return _reduce_query_rows(per_row, index, batch, length, reduction)


def value_relation_kl(
    student_values: Tensor,
    teacher_values: Tensor,
    *,
    num_heads: int,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""MiniLM's value-relation transfer: :func:`self_relation_kl` of the values with R = the head count.

    .. math::

        \mathcal{L} = \frac{1}{A \, |x|} \sum_{a=1}^{A} \sum_{i=1}^{|x|}
            \mathrm{KL}\!\left( \mathrm{VR}^t_{a,i} \,\|\, \mathrm{VR}^s_{a,i} \right), \quad
        \mathrm{VR}_a = \mathrm{softmax}\!\left( \frac{V_a V_a^\top}{\sqrt{d_k}} \right)

    From "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers" (Wang et al., NeurIPS 2020): ``V_a`` is head ``a``'s slice of the last layer's
    values, :math:`d_k` each model's own head size. Both models need ``num_heads`` heads; for other
    head counts use :func:`self_relation_kl` with any R that divides both widths (MiniLMv2).

    Args:
        student_values: ``[B, L, D_s]`` student values, heads concatenated (``D_s = A d_k^s``).
        teacher_values: ``[B, L, D_t]`` teacher values (the same B and L).
        num_heads: the models' attention-head count ``A``.
        mask: optional ``[B, L]`` boolean; False marks padding tokens.
        reduction: ``"mean"`` over valid ``(batch, head, query)`` rows, ``"sum"``, or ``"none"``
            (``[B, A, L]``, 0 at padding queries).

    Returns:
        A scalar, or ``[B, A, L]`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> v_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, L=2, D_s=2]
        >>> v_t = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])  # D_t=4
        >>> value_relation_kl(v_s, v_t, num_heads=1)
        tensor(0.1198)
    """
    return self_relation_kl(
        student_values, teacher_values, num_relation_heads=num_heads, mask=mask, reduction=reduction
    )


def attention_score_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""TinyBERT's attention-based distillation: MSE between unnormalised attention scores.

    .. math::

        \mathcal{L} = \frac{1}{A \sum_b n_b^2} \sum_{b=1}^{B} \sum_{a=1}^{A}
            \sum_{i, j \,\mathrm{valid}} \left( s_{b,a,i,j} - t_{b,a,i,j} \right)^2

    over the valid (query, key) entries of every head, where :math:`n_b` is the number of real
    tokens of sequence ``b`` and the scores are :math:`QK^\top / \sqrt{d_k}` before the softmax.
    From "TinyBERT: Distilling BERT for Natural Language Understanding" (Jiao et al., Findings of
    EMNLP 2020); it needs the same number of heads on both sides.

    The official TinyBERT code (huawei-noah/Pretrained-Language-Model) takes scores that already
    hold the additive padding mask, replaces every score :math:`\le -100` by 0 on both sides and
    averages the squared error over all :math:`B A L^2` entries. Here the ``mask`` selects the
    entries instead: only (valid query, valid key) pairs count, and the mean is over them, so the
    value does not depend on how much padding a batch holds (and a genuine score below -100 is not
    dropped). Padding entries may hold anything (also ``-inf``); every entry that the mask keeps
    must be finite, so scores with a causal mask are not supported.

    Args:
        student_scores: ``[B, A, L, L]`` student attention scores (pre-softmax).
        teacher_scores: ``[B, A, L, L]`` teacher attention scores (the same shape).
        mask: optional ``[B, L]`` boolean; False marks padding tokens.
        reduction: ``"mean"`` over valid ``(batch, head, query, key)`` entries, ``"sum"``, or
            ``"none"`` (``[B, A, L, L]`` squared errors, 0 at entries with a padding query or key).

    Returns:
        A scalar, or ``[B, A, L, L]`` with ``reduction="none"``. Computed in float32 (float64 inputs
        stay float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[[[1.0, 2.0], [0.0, -1e4]]]])  # [B=1, A=1, L=2, L=2]
        >>> t = torch.tensor([[[[0.0, 0.0], [0.0, -1e4]]]])
        >>> attention_score_mse(s, t)  # (1 + 4 + 0 + 0) / 4
        tensor(1.2500)
        >>> attention_score_mse(s, t, mask=torch.tensor([[True, False]]))  # only entry (0, 0)
        tensor(1.)
    """
    check_reduction(reduction)
    batch, heads, length = _check_attention_pair(student_scores, teacher_scores, "attention scores")
    token_mask = _check_token_mask(mask, batch, length)
    dtype = compute_dtype(student_scores)
    s = student_scores.to(dtype)  # (B, A, L, L)
    t = teacher_scores.to(dtype)  # (B, A, L, L)
    if token_mask is None:
        squared = (s - t).square()  # (B, A, L, L)
        count: Tensor | int = squared.numel()
    else:
        keep = (token_mask[:, :, None] & token_mask[:, None, :]).unsqueeze(1)  # (B, 1, L, L)
        # Fill before subtracting: -inf - (-inf) at padding would give NaN values and gradients.
        squared = (s.masked_fill(~keep, 0.0) - t.masked_fill(~keep, 0.0)).square()  # (B, A, L, L)
        count = token_mask.sum(-1).square().sum() * heads
    if reduction == "none":
        return squared
    total = squared.sum()
    if reduction == "sum":
        return total
    if isinstance(count, Tensor):
        return total / count.to(total.dtype).clamp_min(1)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Shapes, masks and reductions shared by the functions above.
# ---------------------------------------------------------------------------------------------


def _check_attention_pair(student: Tensor, teacher: Tensor, what: str) -> tuple[int, int, int]:
    """Both sides ``[B, A, L, L]`` with the same shape; returns ``(B, A, L)``."""
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"{side} {what} must be [B, A, L, L] (heads, queries, keys); got {tuple(x.shape)}"
            )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} must "
            "have the same shape [B, A, L, L]; with different head counts distil relations instead "
            "(self_relation_kl, MiniLMv2), whose number of relation heads is free"
        )
    return student.shape[0], student.shape[1], student.shape[2]


def _check_token_mask(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected [B, L] = {(batch, length)} "
            "(True for real tokens, False for padding)"
        )
    return mask.to(torch.bool)


def _query_rows(x: Tensor) -> Tensor:
    """``[B, H, L, L]`` -> ``[B*L, H, L]``: one row per (sequence, query token), heads inside."""
    batch, heads, length, keys = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, keys)


def _key_mask_rows(token_mask: Tensor, index: Tensor) -> Tensor:
    """The valid keys of each kept query row: ``[N, 1, L]``."""
    batch, length = token_mask.shape
    keys = token_mask.unsqueeze(1).expand(batch, length, length).reshape(batch * length, length)
    return keys.index_select(0, index).unsqueeze(1)


def _renormalise(p: Tensor, eps: float) -> Tensor:
    return p / p.sum(-1, keepdim=True).clamp_min(eps)


def _relation_log_probs(x: Tensor, heads: int, token_mask: Tensor | None, index: Tensor | None) -> Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) over the valid keys, for the kept query rows: ``[N, R, L]``."""
    batch, length, width = x.shape
    size = width // heads
    if token_mask is not None:
        # Zero the padding states first: whatever they hold (NaN included) cannot reach the result.
        x = x.masked_fill(~token_mask.unsqueeze(-1), 0.0)
    split = x.reshape(batch, length, heads, size).transpose(1, 2)  # (B, R, L, d_r)
    scores = split @ split.transpose(-1, -2) / math.sqrt(size)  # (B, R, L, L)
    if token_mask is not None:
        scores = scores.masked_fill(~token_mask[:, None, None, :], -math.inf)
    rows = _query_rows(scores)  # (B*L, R, L)
    if index is not None:
        # Only rows of real tokens are kept, and each has at least one valid key (itself).
        rows = rows.index_select(0, index)  # (N, R, L)
    return torch.log_softmax(rows, dim=-1)


def _reduce_query_rows(
    per_row: Tensor, index: Tensor | None, batch: int, length: int, reduction: str
) -> Tensor:
    """Reduce ``[N, H]`` values of the kept (sequence, query) rows; ``"none"`` gives ``[B, H, L]``."""
    heads = per_row.shape[-1]
    if reduction == "none":
        if index is not None:
            per_row = per_row.new_zeros(batch * length, heads).index_copy(0, index, per_row)
        return per_row.reshape(batch, length, heads).transpose(1, 2)
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / max(per_row.numel(), 1)
