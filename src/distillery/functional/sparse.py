r"""Divergences against a sparse (cached) teacher: its top-k ids plus tail mass, or k sampled ids.

An offline cache of a language model teacher cannot keep its full distribution over a vocabulary of
:math:`V` ids at every token. It stores per token either

* **top-k + tail** (:func:`topk_tail`): the :math:`k` most likely ids, their log-probabilities and
  the tail mass :math:`r = 1 - \sum_{j<k} p_j`; :func:`topk_tail_divergence` compares the
  coarsened :math:`(k+1)`-bucket distributions. Biased, but a bounded lower bound of the full
  divergence, for forward KL, reverse KL and JSD;
* **k sampled ids** (:func:`sample_tokens`): the distinct ids of :math:`K` draws from the teacher with
  their weights :math:`\mathrm{count}/K` and log-probabilities; :func:`sampled_forward_kl` is an
  unbiased estimate of the forward KL and of its gradient ("Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs", Anshumann et al., 2025). Forward KL only: see
  :func:`sparse_divergence_support`.

**Temperature.** The cached teacher distribution is already at the temperature the cache was written
at (the ``temperature`` of :func:`topk_tail` / :func:`sample_tokens`). The ``temperature`` of the
losses here softens the *student's* logits and sets the :math:`T^2` factor only; the caller checks
that it equals the cache's temperature.

:func:`chunked_sparse_kd_from_hidden` evaluates both losses from the student's hidden states and LM
head chunk by chunk (the machinery of :mod:`distillery.functional.chunked`), so that a training step
on a cached teacher never builds the student's ``[tokens, vocab]`` logits. :func:`quantize_logprobs`
stores the cached log-probabilities in 8 bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distillery.functional._rows import (
    LOG_FLOOR,
    check_reduction,
    check_temperature,
    check_unit_interval,
    compute_dtype,
    flatten_rows,
    reduce_rows,
)
from distillery.functional.chunked import _apply, _check_head, _check_reduction_and_chunk, _scale, _valid_rows
from distillery.functional.divergences import generalized_jsd, reverse_kl

# Sparse teacher kind -> the divergences it supports.
SPARSE_DIVERGENCES: dict[str, tuple[str, ...]] = {
    "topk": ("forward_kl", "reverse_kl", "jsd"),
    "sampled": ("forward_kl",),
}

# The kind's extra cached tensor: (argument name, one value per slot (True) or per row (False)).
_EXTRA = {"topk": ("teacher_tail", False), "sampled": ("teacher_weights", True)}


def sparse_divergence_support(kind: str, divergence: str) -> str | None:
    """None when ``divergence`` can be computed from a sparse teacher of this ``kind``, else why not.

    Supported: kind ``"topk"`` (top-k ids + tail mass) with ``forward_kl``, ``reverse_kl`` and ``jsd``;
    kind ``"sampled"`` (k sampled ids) with ``forward_kl`` only.

    Example:
        >>> sparse_divergence_support("topk", "jsd") is None
        True
        >>> print(sparse_divergence_support("sampled", "reverse_kl").split(":")[0])
        divergence 'reverse_kl' cannot be estimated from a sampled teacher (kind 'sampled')
    """
    if kind not in SPARSE_DIVERGENCES:
        return f"unknown sparse teacher kind {kind!r}; choose one of {', '.join(SPARSE_DIVERGENCES)}"
    if divergence not in SPARSE_DIVERGENCES["topk"]:
        return (
            f"unknown divergence {divergence!r} for a sparse teacher; choose one of forward_kl, reverse_kl, "
            "jsd (kind 'topk') or forward_kl (kind 'sampled'); the other divergences need the teacher's "
            "full distribution: use a dense cache or a live teacher"
        )
    if divergence not in SPARSE_DIVERGENCES[kind]:
        return (
            f"divergence {divergence!r} cannot be estimated from a sampled teacher (kind 'sampled'): "
            "reverse_kl and jsd need the teacher's probability at the tokens the student finds likely, "
            "which k samples of the teacher do not give (an importance-weighted estimate has unbounded "
            "variance); use kind 'topk' (top-k ids + tail mass), divergence 'forward_kl' (unbiased from "
            "samples), or a dense cache / live teacher"
        )
    return None


def check_sparse_divergence(kind: str, divergence: str) -> None:
    """Raise ``ValueError`` with :func:`sparse_divergence_support`'s message when unsupported.

    Example:
        >>> check_sparse_divergence("sampled", "forward_kl")
    """
    message = sparse_divergence_support(kind, divergence)
    if message is not None:
        raise ValueError(message)


def _check_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer with 1 <= k <= V={vocab} (the logits' last dim); got k={k!r}")


def _teacher_rows(
    kind: str,
    lead: torch.Size,
    vocab: int,
    index: Tensor | None,
    dtype: torch.dtype,
    ids: Tensor,
    logp: Tensor,
    extra: Tensor,
    logp_name: str = "teacher_logp",
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the cached teacher tensors against the student's rows and return them over the valid rows:
    ``(ids int64 [N, k], logp [N, k], extra [N] (tail) or [N, k] (weights))``, values in ``dtype``.

    The ids are checked (range; for top-k, distinct within a row) on the valid rows only, with one
    host sync: masked rows (padding) may hold anything.
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must hold integer token ids; got dtype {ids.dtype}")
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids has shape {tuple(ids.shape)}; expected [..., k] with the student's leading "
            f"shape {tuple(lead)}"
        )
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(
            f"teacher_ids has k={k} slots per row; need 1 <= k <= V={vocab} (the student's vocabulary)"
        )
    extra_name, per_slot = _EXTRA[kind]
    out = [ids.reshape(-1, k)]
    for name, x, slots in ((logp_name, logp, True), (extra_name, extra, per_slot)):
        shape = ids.shape if slots else lead
        if x.shape != shape:
            what = "one value per slot of teacher_ids" if slots else "one value per row"
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} ({what})")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        out.append(x.reshape(-1, k) if slots else x.reshape(-1))
    if index is not None:
        out = [x.index_select(0, index) for x in out]
    ids, logp, extra = out[0].long(), out[1].to(dtype), out[2].to(dtype)
    flags = [((ids < 0) | (ids >= vocab)).any()]
    if kind == "topk":  # an id twice in a row: a count above 1 (cheaper than sorting the rows)
        seen = torch.zeros(ids.shape[0], vocab, dtype=torch.uint8, device=ids.device)
        repeats = seen.scatter_add_(1, ids.clamp(0, vocab - 1), torch.ones_like(ids, dtype=torch.uint8)) > 1
        flags.append(repeats.any())
    else:
        flags.append((extra < 0).any())
    out_of_range, bad = torch.stack(flags).tolist()
    if out_of_range:
        first = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise ValueError(f"teacher_ids holds id {first}, outside [0, {vocab}) (the student's vocabulary)")
    if bad and kind == "topk":
        row = int(repeats.any(-1).nonzero()[0])
        raise ValueError(
            f"teacher_ids repeats an id within a row (valid row {row}: {ids[row].tolist()}); the top-k ids "
            "of a row must be distinct (torch.topk gives distinct ids)"
        )
    if bad:
        raise ValueError(f"teacher_weights must be >= 0 (sample counts / draws); got {extra.min().item()}")
    return ids, logp, extra


# Below this student tail mass, 1 - sum_j q_j has lost most of its digits (the kept log-probabilities
# carry an absolute error of about 1e-6 in float32): such rows take the exact log-sum over the other ids.
_TAIL_EXACT_BELOW = {torch.float32: 1e-4, torch.float64: 1e-10}


def _student_log_tail(z: Tensor, ids: Tensor, log_top: Tensor, empty: bool) -> Tensor:
    """``[N, 1]`` log of the student's mass outside the kept ids.

    From the kept probabilities, ``log(1 - sum_j q_j)`` (summed in float64): no second pass over the
    vocabulary, so a top-k step costs about what a cross-entropy step does. Rows whose tail is too small
    for that subtraction (:data:`_TAIL_EXACT_BELOW`) take the exact ``logsumexp`` over the other ids, the
    top-k slots set to LOG_FLOOR (exp gives exactly 0). With k = V there is no other id: the log mass is
    LOG_FLOOR (mass 0, gradient 0), finite, so that the buckets take the divergences' fused path.
    """
    if empty:
        return log_top.new_full((log_top.shape[0], 1), LOG_FLOOR)
    rest = 1.0 - log_top.double().exp().sum(-1, keepdim=True)  # (N, 1)
    exact = rest < _TAIL_EXACT_BELOW.get(z.dtype, 1e-4)
    log_rest = rest.clamp_min(1e-300).log().to(z.dtype)
    if bool(exact.any()):
        rows = exact.squeeze(-1).nonzero().squeeze(-1)
        zr = z[rows]
        precise = zr.scatter(-1, ids[rows], LOG_FLOOR).logsumexp(-1, keepdim=True) - zr.logsumexp(
            -1, keepdim=True
        )
        log_rest = log_rest.index_put((rows,), precise)
    return log_rest


class _SparseForwardKL(torch.autograd.Function):
    """Per-row forward KL to a sparse teacher with its gradient in closed form: one softmax over the
    vocabulary, as in cross-entropy, instead of autograd through log-softmax, gathers and buckets.

    With ``q = softmax(z)``, ``z = s / T``: top-k + tail (teacher buckets ``P``, student tail ``Q_k``)
    gives ``dL/dz_i = q_i - P_j`` at the kept id ``i_j`` and ``q_i (1 - P_k / Q_k)`` elsewhere; sampled
    (weights ``w``) gives ``dL/dz = (sum_j w_j) q - sum_j w_j e_{i_j}``. ``dL/ds = T dL/dz`` for the
    ``T^2``-scaled loss. The teacher is a constant (no gradient).
    """

    @staticmethod
    def forward(ctx, s, ids, log_p, weights, temperature, kind):
        z = s if temperature == 1.0 else s / temperature
        log_sm = torch.log_softmax(z, -1)  # (N, V)
        log_top = log_sm.gather(-1, ids)  # (N, k)
        if kind == "topk":
            log_tail = _student_log_tail(z, ids, log_top, ids.shape[-1] == s.shape[-1])  # (N, 1)
            log_q = torch.cat([log_top, log_tail], -1)  # (N, k + 1)
            p = log_p.exp()
            rows = torch.where(p > 0, p * (log_p - log_q.clamp_min(LOG_FLOOR)), torch.zeros_like(p)).sum(-1)
            ctx.save_for_backward(log_sm, ids, p, log_tail)
        else:
            diff = torch.where(weights != 0, log_p - log_top.clamp_min(LOG_FLOOR), torch.zeros_like(log_top))
            rows = (weights * diff).sum(-1)
            ctx.save_for_backward(log_sm, ids, weights)
        ctx.kind, ctx.temperature = kind, temperature
        return rows * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        scale = (grad_rows * ctx.temperature).unsqueeze(-1)  # (N, 1)
        if ctx.kind == "topk":
            log_sm, ids, p, log_tail = ctx.saved_tensors
            q = log_sm.exp()
            # P_k / Q_k, finite even where the student's tail underflows (its q_i are then 0 as well)
            ratio = (p[:, -1:].clamp_min(1e-300).log() - log_tail).exp().clamp_max(1e30)
            ratio = torch.where(p[:, -1:] > 0, ratio, torch.zeros_like(ratio))
            g = q * (1.0 - ratio)
            g.scatter_(-1, ids, q.gather(-1, ids) - p[:, :-1])
        else:
            log_sm, ids, weights = ctx.saved_tensors
            g = log_sm.exp() * weights.sum(-1, keepdim=True)
            g.scatter_add_(-1, ids, -weights)
        return g * scale, None, None, None, None, None


def _normalised_buckets(logp: Tensor, tail: Tensor, empty: bool) -> Tensor:
    """``[N, k + 1]`` the teacher's log-probabilities of the kept ids and of the tail, renormalised."""
    safe = tail.clamp_min(torch.finfo(tail.dtype).tiny).log()
    log_tail = torch.where(tail > 0, safe, LOG_FLOOR) if not empty else torch.full_like(tail, LOG_FLOOR)
    buckets = torch.cat([logp.clamp_min(LOG_FLOOR), log_tail.unsqueeze(-1)], -1)
    return torch.log_softmax(buckets, -1)


def _topk_rows(
    s: Tensor, ids: Tensor, logp: Tensor, tail: Tensor, divergence: str, temperature: float, beta: float
) -> Tensor:
    """Per-row ``T^2 D`` of the (k+1)-bucket coarsenings for student logits ``[N, V]``."""
    empty = ids.shape[-1] == s.shape[-1]
    if divergence == "forward_kl":
        return _SparseForwardKL.apply(
            s, ids, _normalised_buckets(logp, tail, empty), None, temperature, "topk"
        )
    z = s if temperature == 1.0 else s / temperature
    # the one pass over the vocabulary, fused forward and backward (as in cross-entropy)
    log_top = torch.log_softmax(z, -1).gather(-1, ids)  # (N, k)
    log_q = torch.cat([log_top, _student_log_tail(z, ids, log_top, empty)], -1)  # (N, k + 1)
    # A zero (or, from rounding, negative) teacher tail is floored, not -inf: 0 log 0 = 0 exactly. With
    # k = V the tail bucket is empty on both sides and teacher_tail is ignored.
    log_p = _normalised_buckets(logp, tail, empty)  # (N, k + 1)
    fn = {"reverse_kl": reverse_kl, "jsd": generalized_jsd}[divergence]
    kw = {"beta": beta} if divergence == "jsd" else {}
    return fn(log_q, log_p, reduction="none", **kw) * temperature**2


def _sampled_rows(s: Tensor, ids: Tensor, logp: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Per-row ``T^2 sum_j w_j (logp_j - log q_{id_j})`` for student logits ``[N, V]`` (a zero-weight slot,
    even with logp = -inf, gives exactly 0)."""
    return _SparseForwardKL.apply(s, ids, logp, weights, temperature, "sampled")


def _rows(
    kind: str, s: Tensor, teacher: tuple[Tensor, Tensor, Tensor], divergence: str, T: float, beta: float
) -> Tensor:
    if kind == "topk":
        return _topk_rows(s, *teacher, divergence, T, beta)
    return _sampled_rows(s, *teacher, T)


def topk_tail_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    teacher_tail: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""A divergence between the student and a cached top-k + tail teacher, on k+1 buckets.

    Both distributions are coarsened to :math:`k + 1` buckets: bucket :math:`j < k` is the id
    :math:`i_j` (``teacher_ids[..., j]``), bucket :math:`k` is every other id (the tail):

    .. math::

        P_j = \frac{e^{\ell_j}}{Z},\quad P_k = \frac{r}{Z},\quad Z = \sum_{j<k} e^{\ell_j} + r;
        \qquad Q_j = q(i_j),\quad Q_k = \sum_{i \notin \{i_j\}} q(i),
        \quad q = \mathrm{softmax}(s / T)

    and the loss is :math:`T^2 D(P, Q)` with :math:`D` forward KL :math:`\mathrm{KL}(P\|Q)`, reverse
    KL :math:`\mathrm{KL}(Q\|P)` or JSD(:math:`\beta`) (:func:`generalized_jsd`'s convention from
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", including the
    exact ends: ``beta=0`` is forward KL, ``beta=1`` reverse KL). The teacher's buckets are
    renormalised (:math:`Z`): after fp16 or 8-bit storage they need not sum exactly to 1. The student's
    tail is :math:`1 - \sum_j Q_j`, summed in float64 from the kept probabilities, so that the step makes
    one pass over the vocabulary (its log-softmax) like cross-entropy; rows where that subtraction loses
    its digits (a tail below 1e-4 in float32, 1e-10 in float64: a confident student) take the exact
    :math:`\exp(\operatorname{logsumexp}_{i \notin \{i_j\}} s_i/T - \operatorname{logsumexp}_i s_i/T)`.
    Forward KL's gradient is computed in closed form (:math:`q_i - P_j` at the kept ids,
    :math:`q_i (1 - P_k / Q_k)` elsewhere); the teacher's tensors get no gradient. Terms with no mass give
    :math:`0 \log 0 = 0`: a zero teacher tail, also with an empty student tail (:math:`k = V`),
    contributes exactly 0 with finite gradients. Where the teacher has no mass but the student has
    some (a zero tail for reverse KL), the divergence is infinite; it is floored like the dense
    functions' (``LOG_FLOOR``): finite, but huge. So store tails in a format that does not round
    small ones to 0 (float32, bfloat16), or clamp them to a small positive value.

    **A lower bound.** Merging ids is a deterministic map of both distributions, so by the
    data-processing inequality each of these divergences of the coarsened distributions is at most
    the same divergence of the full ones, with equality when :math:`k = V` (then the tail bucket is
    empty on both sides, ``teacher_tail`` is ignored, and the value is exactly :func:`forward_kl`,
    :func:`reverse_kl` or :func:`generalized_jsd` of the full distributions). For :math:`k < V` the
    loss and its gradient are biased: the student's distribution inside the tail is not constrained.

    **Temperature.** The cached teacher is already at the cache's temperature; ``temperature`` here
    softens the student's logits and scales by :math:`T^2` only. The caller checks that it equals the
    temperature the cache was written at (:func:`topk_tail`'s).

    Args:
        student_logits: ``[..., V]`` student logits; leading dims of any rank are flattened into rows.
        teacher_ids: ``[..., k]`` integer ids of the teacher's top-k tokens, distinct within a row
            (a repeated id raises ``ValueError``), ``1 <= k <= V``.
        teacher_logp: ``[..., k]`` the teacher's log-probabilities at those ids.
        teacher_tail: ``[...]`` the teacher's mass outside the top-k ids, :math:`r = 1 - \sum_j p_j`.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: :math:`T > 0` of the student's logits and of the :math:`T^2` factor.
        beta: JSD's mixture weight :math:`\beta \in [0, 1]` of the teacher (``"jsd"`` only).
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored, and their
            teacher tensors may hold anything.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this count instead (the global number of valid
            rows across gradient-accumulation steps and data-parallel ranks).

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, 0.5]])
        >>> ids, logp, tail = topk_tail(torch.tensor([[1.5, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 1.0]]), 2)
        >>> topk_tail_divergence(s, ids, logp, tail)
        tensor(0.2030)
        >>> topk_tail_divergence(s, ids, logp, tail, divergence="jsd", reduction="none")
        tensor([0.0213, 0.0826])
    """
    _check_arguments("topk", divergence, reduction, temperature, beta)
    s, _, _, index, lead = flatten_rows(student_logits, None, mask)
    teacher = _teacher_rows(
        "topk", lead, s.shape[-1], index, s.dtype, teacher_ids, teacher_logp, teacher_tail
    )
    per_row = _topk_rows(s, *teacher, divergence, temperature, beta)
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def sampled_forward_kl(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_weights: Tensor,
    teacher_logp: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Unbiased forward KL from k sampled teacher tokens, scaled by :math:`T^2`.

    From "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (Anshumann et al.,
    2025): with :math:`K` draws with replacement from the teacher's distribution :math:`p`, the
    weights :math:`w_j = \mathrm{count}(i_j) / K` of the distinct sampled ids (:func:`sample_tokens`)
    estimate :math:`p` without bias, so

    .. math::

        \mathcal{L} = T^2 \sum_j w_j \left(\log p(i_j) - \log q(i_j)\right),
        \quad q = \mathrm{softmax}(s / T)

    is an unbiased estimate of :math:`T^2\,\mathrm{KL}(p \,\|\, q)`, and its gradient
    :math:`T\,(\textstyle\sum_j w_j\, q - w)` of the full forward KL gradient :math:`T\,(q - p)` (top-k
    distillation is biased). A single estimate can be negative. The weights are taken as given and need
    not sum exactly to 1 (e.g. after storage rounding); the gradient then pushes a total mass of
    :math:`\sum_j w_j`. Zero-weight slots (unused slots, any id) contribute exactly nothing, also when
    their ``teacher_logp`` is ``-inf``; repeated ids just add their weights.

    **Temperature.** The cached teacher was sampled at the cache's temperature; ``temperature`` here
    softens the student's logits and scales by :math:`T^2` only. The caller checks that it equals the
    temperature the cache was written at (:func:`sample_tokens`'s).

    Only forward KL can be estimated from samples of the teacher; see
    :func:`sparse_divergence_support`.

    Args:
        student_logits: ``[..., V]`` student logits; leading dims of any rank are flattened into rows.
        teacher_ids: ``[..., k]`` integer ids of the sampled tokens, ``1 <= k <= V``.
        teacher_weights: ``[..., k]`` their weights ``count / draws`` (>= 0; 0 for unused slots).
        teacher_logp: ``[..., k]`` the teacher's log-probabilities at those ids.
        temperature: :math:`T > 0` of the student's logits and of the :math:`T^2` factor.
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 1.5, -1.0, 0.0]])
        >>> ids, weights = torch.tensor([[0, 1, 3]]), torch.tensor([[0.5, 0.25, 0.25]])  # 4 draws: 0, 0, 1, 3
        >>> logp = torch.tensor([[2.0, 1.0, -1.0, 0.5]]).log_softmax(-1)[:, [0, 1, 3]]
        >>> sampled_forward_kl(s, ids, weights, logp)
        tensor(0.1528)
    """
    _check_arguments("sampled", "forward_kl", reduction, temperature, 0.0)
    s, _, _, index, lead = flatten_rows(student_logits, None, mask)
    teacher = _teacher_rows(
        "sampled", lead, s.shape[-1], index, s.dtype, teacher_ids, teacher_logp, teacher_weights
    )
    return reduce_rows(_sampled_rows(s, *teacher, temperature), index, lead, reduction, num_valid)


def _check_arguments(kind: str, divergence: str, reduction: str, temperature: float, beta: float) -> None:
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    check_unit_interval("beta", beta)
    check_sparse_divergence(kind, divergence)


def chunked_sparse_kd_from_hidden(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_ids: Tensor,
    teacher_values: Tensor,
    *,
    kind: str = "topk",
    teacher_tail: Tensor | None = None,
    teacher_weights: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    student_head_bias: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    chunk_size: int = 256,
) -> Tensor:
    r"""A sparse-teacher divergence from the student's hidden states and LM head, chunk by chunk.

    With :math:`s = h W^\top + b` the student's logits, this returns exactly
    :func:`topk_tail_divergence` (``kind="topk"``) or :func:`sampled_forward_kl` (``kind="sampled"``)
    of :math:`s`, without building the ``[tokens, vocab]`` logits: the valid tokens are processed
    ``chunk_size`` at a time and each chunk's gradients of the hidden states, weight and bias are
    computed in the forward pass, as in :func:`chunked_kd_from_hidden` (whose memory, precision and
    ``reduction="none"`` notes apply). The cached teacher is a constant and never receives a gradient.
    The value and gradients equal the unchunked functions on the full logits up to float32 rounding.

    Args:
        student_hidden: ``[..., H]`` the student's final hidden states; the leading dims are flattened
            into tokens.
        student_head_weight: ``[V, H]`` the student's LM head (an ``nn.Linear.weight``).
        teacher_ids: ``[..., k]`` the cached teacher ids (top-k, or sampled).
        teacher_values: ``[..., k]`` the teacher's log-probabilities at those ids.
        kind: ``"topk"`` or ``"sampled"``.
        teacher_tail: ``[...]`` the tail mass outside the top-k ids (``kind="topk"`` only).
        teacher_weights: ``[..., k]`` the samples' weights ``count / draws`` (``kind="sampled"`` only).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (top-k); ``"forward_kl"``
            (sampled); see :func:`sparse_divergence_support`.
        temperature: :math:`T > 0` of the student's logits and of the :math:`T^2` factor (the cache is
            already at its own temperature; the caller checks that they agree).
        beta: JSD's mixture weight :math:`\beta \in [0, 1]` of the teacher.
        student_head_bias: optional ``[V]`` bias of the student's head.
        mask: optional ``[...]`` boolean; False tokens are skipped and get a zero gradient.
        reduction: ``"mean"`` over valid tokens or ``"sum"``.
        num_valid: with ``"mean"``, divide the sum by this (global) count instead.
        chunk_size: tokens per chunk (>= 1).

    Returns:
        A scalar in float32 (float64 for float64 inputs). With no valid token it is 0 with zero
        gradients.

    Example:
        >>> import torch
        >>> h = torch.arange(24.0).reshape(2, 3, 4).sin().requires_grad_()
        >>> w = torch.arange(40.0).reshape(10, 4).cos().requires_grad_()
        >>> ids, logp, tail = topk_tail(torch.arange(60.0).reshape(2, 3, 10).cos() * 3, 4)
        >>> loss = chunked_sparse_kd_from_hidden(h, w, ids, logp, teacher_tail=tail, chunk_size=4)
        >>> round(loss.item(), 4)
        1.4491
        >>> bool(torch.allclose(loss, topk_tail_divergence(h @ w.T, ids, logp, tail)))
        True
    """
    _check_reduction_and_chunk(reduction, chunk_size, "chunked_sparse_kd_from_hidden")
    _check_arguments(kind, divergence, reduction, temperature, beta)
    given = {"teacher_tail": teacher_tail, "teacher_weights": teacher_weights}
    needed = _EXTRA[kind][0]
    (other,) = set(given) - {needed}
    if given[needed] is None:
        raise ValueError(f"kind={kind!r} needs {needed}")
    if given[other] is not None:
        raise ValueError(f"{other} is not used with kind={kind!r}; pass {needed} instead")
    _check_head("student", student_hidden, student_head_weight, student_head_bias)
    lead, vocab = student_hidden.shape[:-1], student_head_weight.shape[0]
    cdtype = compute_dtype(student_hidden)
    index = _valid_rows(mask, lead)
    teacher = _teacher_rows(
        kind, lead, vocab, index, cdtype, teacher_ids, teacher_values, given[needed], "teacher_values"
    )
    teacher = tuple(x.detach() for x in teacher)
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    if index is not None:
        h = h.index_select(0, index)

    def loss_of_chunk(s: Tensor, start: int, stop: int) -> Tensor:
        chunk = tuple(x[start:stop] for x in teacher)
        return _rows(kind, s, chunk, divergence, temperature, beta).sum()

    scale = _scale(reduction, num_valid, h.shape[0], cdtype, h.device)
    return _apply(
        h, student_head_weight, student_head_bias, loss_of_chunk, vocab, scale, chunk_size, student_hidden
    )


def _scaled_rows(logits: Tensor, k: int, temperature: float) -> Tensor:
    """``logits / T`` as ``[rows, V]`` in the compute dtype, after checking ``k`` and ``T``."""
    check_temperature("temperature", temperature)
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(
            f"logits must be a floating-point [..., V] tensor; got {logits.dtype} {tuple(logits.shape)}"
        )
    _check_k(k, logits.shape[-1])
    return logits.detach().reshape(-1, logits.shape[-1]).to(compute_dtype(logits)) / temperature


def tail_from_topk_logp(logp: Tensor, floor: float = 1e-6) -> Tensor:
    r"""The tail mass of a teacher known only by its top-k log-probabilities (a teacher server's answer).

    .. math::

        r = \max\left(\epsilon, 1 - \sum_{j<k} \exp(\log p_j)\right)

    summed in float64. Without the logits the tail cannot be computed as :func:`topk_tail` does, and
    its digits below about 1e-7 are the rounding of the server's float32 log-probabilities; the floor
    :math:`\epsilon` keeps reverse KL and JSD finite (a zero teacher tail beside a student that puts
    mass there is an infinite reverse KL, see :func:`topk_tail_divergence`).

    Args:
        logp: ``[..., k]`` log-probabilities of the top-k ids.
        floor: :math:`\epsilon`, the least tail.

    Returns:
        ``[...]`` in float32.

    Example:
        >>> import torch
        >>> round(tail_from_topk_logp(torch.tensor([0.5, 0.3]).log()).item(), 4)
        0.2
    """
    return (1.0 - logp.double().exp().sum(-1)).clamp(floor, 1.0).float()


def topk_tail(logits: Tensor, k: int, *, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""Compress a teacher's logits to its top-k ids, their log-probabilities and the tail mass.

    With :math:`p = \mathrm{softmax}(t / T)`: the :math:`k` ids of largest probability (sorted by
    descending probability; ties in ``torch.topk``'s order), :math:`\log p` at them, and the tail

    .. math::

        r = 1 - \sum_{j<k} p(i_j) = \exp\left(\operatorname{logsumexp}_{i \notin \{i_j\}} t_i/T
            - \operatorname{logsumexp}_i t_i/T\right)

    computed as the right-hand side (accurate also when the top-k hold almost all the mass), clamped
    to :math:`[0, 1]`, and exactly 0 when :math:`k = V`. The input to :func:`topk_tail_divergence`.
    No gradient (cache writing).

    Args:
        logits: ``[..., V]`` teacher logits.
        k: ids to keep, ``1 <= k <= V``.
        temperature: :math:`T > 0` the cache is written at.

    Returns:
        ``(ids int64 [..., k], logp [..., k], tail [...])``, ``logp`` and ``tail`` in float32 (float64
        for float64 logits).

    Example:
        >>> import torch
        >>> ids, logp, tail = topk_tail(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), 2)
        >>> ids, round(tail.item(), 4)
        (tensor([[1, 3]]), 0.1192)
    """
    z = _scaled_rows(logits, k, temperature)
    lse = z.logsumexp(-1)  # (R,)
    top, ids = z.topk(k, dim=-1)  # (R, k)
    if k == z.shape[-1]:
        tail = torch.zeros_like(lse)
    else:
        tail = (z.scatter(-1, ids, -math.inf).logsumexp(-1) - lse).exp().clamp(0.0, 1.0)
    lead = logits.shape[:-1]
    return ids.reshape(*lead, k), (top - lse.unsqueeze(-1)).reshape(*lead, k), tail.reshape(lead)


def sample_tokens(
    logits: Tensor,
    k: int,
    *,
    draws: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Compress a teacher's logits to k sampled tokens with weights (Sparse Logit Sampling).

    From "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (Anshumann et al.,
    2025): per row, ``draws`` ids are drawn with replacement from :math:`p = \mathrm{softmax}(t / T)`
    (``torch.multinomial``); the slots hold the distinct drawn ids (sorted by id, so the layout is
    deterministic) with weights :math:`w = \mathrm{count} / \mathrm{draws}` and the teacher's
    :math:`\log p` at each id. Slots beyond the distinct ids have weight 0 and some other id. Then
    :math:`E[w] = p`, and :func:`sampled_forward_kl` is unbiased.

    With ``draws = k`` (the default) at most :math:`k` distinct ids occur and the weights are exact.
    With ``draws > k`` there may be more distinct ids than slots: the :math:`k` most drawn are kept
    and their weights renormalised to sum to 1, which makes the estimate slightly biased (towards the
    teacher's likely ids). No gradient (cache writing).

    Args:
        logits: ``[..., V]`` teacher logits (typically ``[N, V]``, one row per token).
        k: slots per row, ``1 <= k <= V``.
        draws: samples per row (>= 1); default ``k``.
        temperature: :math:`T > 0` the cache is written at.
        generator: the ``torch.Generator`` for ``torch.multinomial`` (reproducible caches).

    Returns:
        ``(ids int64 [..., k], weights [..., k], logp [..., k])``, ``weights`` and ``logp`` in float32
        (float64 for float64 logits). ``logp`` may be ``-inf`` at zero-weight slots.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> ids, weights, logp = sample_tokens(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), 3, draws=8, generator=g)
        >>> round(weights.sum().item(), 4), bool((ids.diff(dim=-1) > 0).all())
        (1.0, True)
    """
    z = _scaled_rows(logits, k, temperature)
    draws = k if draws is None else draws
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1 (samples per row); got {draws!r}")
    logp = z.log_softmax(-1)  # (R, V)
    picks = torch.multinomial(logp.exp(), draws, replacement=True, generator=generator)  # (R, draws)
    counts = torch.zeros_like(logp).scatter_add_(-1, picks, torch.ones_like(picks, dtype=logp.dtype))
    kept, ids = counts.topk(k, dim=-1)  # (R, k) the most drawn ids
    ids, order = ids.sort(-1)
    kept = kept.gather(-1, order)
    # The kept counts sum to `draws` unless more than k distinct ids were drawn: then renormalise.
    weights = kept / kept.sum(-1, keepdim=True)
    shape = (*logits.shape[:-1], k)
    return ids.reshape(shape), weights.reshape(shape), logp.gather(-1, ids).reshape(shape)


def quantize_logprobs(logp: Tensor) -> tuple[Tensor, Tensor]:
    r"""8-bit codes of log-probabilities ``[..., k]`` with one scale per row.

    .. math::

        \sigma = \frac{\max(-\min_j \ell_j,\ \mathrm{tiny})}{255},\qquad
        c_j = \mathrm{clamp}(\mathrm{round}(-\ell_j / \sigma), 0, 255),\qquad
        \hat\ell_j = -c_j\, \sigma

    (the minimum over the row's finite entries). For :math:`\ell_j \in [-255\sigma, 0]` the decoded
    value is within :math:`\sigma / 2` of :math:`\ell_j` in log space (plus float32 rounding), i.e. a
    relative error of at most :math:`e^{\sigma/2} - 1` in probability. ``-inf`` (zero probability) and
    other non-finite values map to code 255, which decodes to the row's smallest representable
    log-probability :math:`-255\sigma` (probability :math:`e^{-255\sigma}`, the row's smallest one),
    not to ``-inf``. So a row whose finite entries are all close to 0 (e.g. one id of probability
    about 1 next to ``-inf`` slots) has a tiny scale, and its ``-inf`` entries decode to a probability
    of about 1: floor ``-inf`` at a finite log-probability (say -30) before quantizing if such rows
    occur. Slightly positive values (rounding) decode to 0.

    Args:
        logp: ``[..., k]`` log-probabilities (``<= 0``), ``k >= 1``.

    Returns:
        ``(codes uint8 [..., k], scale float32 [...])``; decode with :func:`dequantize_logprobs`.

    Example:
        >>> import torch
        >>> codes, scale = quantize_logprobs(torch.tensor([[-0.1, -2.0, -float("inf")]]))
        >>> codes, round(scale.item(), 6)
        (tensor([[ 13, 255, 255]], dtype=torch.uint8), 0.007843)
    """
    if not logp.is_floating_point() or logp.dim() < 1 or logp.shape[-1] < 1:
        raise ValueError(
            f"logp must be a floating-point [..., k] tensor, k >= 1; got {logp.dtype} {tuple(logp.shape)}"
        )
    x = logp.detach().float()
    finite = torch.isfinite(x)
    low = torch.where(finite, x, torch.zeros_like(x)).amin(-1)  # (...) the most negative finite value
    scale = (-low).clamp_min(torch.finfo(torch.float32).tiny) / 255.0
    codes = torch.where(finite, -x / scale.unsqueeze(-1), torch.full_like(x, 255.0))
    return codes.round().clamp(0.0, 255.0).to(torch.uint8), scale


def dequantize_logprobs(codes: Tensor, scale: Tensor) -> Tensor:
    """Log-probabilities ``-codes * scale`` (float32 ``[..., k]``) of :func:`quantize_logprobs`' output.

    Args:
        codes: ``[..., k]`` uint8 codes.
        scale: ``[...]`` the per-row scales.

    Example:
        >>> import torch
        >>> dequantize_logprobs(torch.tensor([[13, 255]], dtype=torch.uint8), torch.tensor([2.0 / 255]))
        tensor([[-0.1020, -2.0000]])
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 (quantize_logprobs' output); got dtype {codes.dtype}")
    if codes.dim() < 1 or scale.shape != codes.shape[:-1]:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}; expected the codes' leading shape "
            f"{tuple(codes.shape[:-1])} (one scale per row)"
        )
    return -(codes.float() * scale.float().unsqueeze(-1))
