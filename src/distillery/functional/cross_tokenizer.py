r"""Distillation between a teacher and a student that use different tokenizers.

Two families, both needing no shared vocabulary:

* :func:`uld_loss` compares the two next-token distributions *as sorted probability vectors*, so the
  vocabularies need neither the same size nor any token in common ("Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", Boizard et al., 2024). The caller
  pairs row ``i`` of the student with row ``i`` of the teacher (typically the i-th response token of
  each tokenization).
* :func:`span_likelihood_loss` matches the likelihoods that both models give to the same pieces of
  text: spans of characters at whose ends both tokenizations have a token boundary ("Cross-Tokenizer
  Distillation via Approximate Likelihood Matching", Minixhofer et al., 2025; later versions are
  titled "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching"). The spans come
  from :func:`distillery.data.text.alignment.aligned_spans` and
  :func:`~distillery.data.text.alignment.span_index`.

The teacher side never receives a gradient in either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.functional._rows import (
    check_reduction,
    check_temperature,
    compute_dtype,
    flatten_rows,
    reduce_rows,
)

SPAN_KINDS = ("binary_kl", "binary_ce", "abs")

# The official ALM code shifts the scaled log-likelihoods by this much below 0, so that log(1 - p) stays
# finite for a span of probability 1.
_BINARY_EPS = 1.0e-6


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    teacher_temperature: float | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Universal Logit Distillation: the l1 distance between sorted probability vectors.

    From "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"
    (Boizard et al., 2024). Per row, with :math:`p_s = \mathrm{softmax}(s / T_s)` over the student's
    :math:`V_s` ids and :math:`p_t = \mathrm{softmax}(t / T_t)` over the teacher's :math:`V_t` ids,
    both sorted in descending order and the shorter one padded with zeros to
    :math:`V = \max(V_s, V_t)`:

    .. math::

        \mathcal{L} = \sum_{i=1}^{V} \left| p_s^{\downarrow}(i) - p_t^{\downarrow}(i) \right|

    The paper derives this as the closed form of the Wasserstein-1 distance between the two
    distributions under its uniform transport-cost assumption. Sorting gives the best one-to-one
    matching for this cost, so the value is also the smallest l1 distance over all matchings of the
    padded vocabularies. It is 0 exactly when the two distributions are the same up to a relabelling
    of ids (padding ids of zero probability allowed), does not change when either vocabulary is
    permuted, is symmetric when :math:`V_s = V_t`, and lies in :math:`[0, 2]`.

    **What the official code does, and what this function does.** The official implementation
    (``DistillationLoss`` in the authors' ``llm-recipes``) softmaxes each side at its own
    temperature (``student_temperature``, ``teacher_temperature``, both 1 by default), sorts both in
    descending order, **pads the smaller vocabulary with zeros** (it does not truncate to the smaller
    one), and sums the absolute differences per token. It uses no :math:`T^2` factor, and neither
    does this function. It computes the teacher without gradient, as this function does (the teacher
    is detached). Its per-token values are averaged over each sequence's response tokens and then
    over the sequences; here ``"mean"`` averages over all valid rows (tokens) instead, the
    convention of every logit function in :mod:`distillery.functional`. The code also pairs the k-th
    response token of the student with the k-th response token of the teacher and cuts both to the
    shorter response; here the caller pairs the rows and masks the rest (``mask``). The weight
    :math:`\lambda` of the distillation term and the cross-entropy added to it belong to the loss
    term, not to this function.

    Args:
        student_logits: ``[..., V_s]`` student logits; leading dims of any rank are flattened into rows.
        teacher_logits: ``[..., V_t]`` teacher logits with the same leading shape; ``V_t`` may differ
            from ``V_s``. Detached: no gradient reaches the teacher.
        temperature: :math:`T_s > 0` of the student's softmax (and of the teacher's unless
            ``teacher_temperature`` is given).
        teacher_temperature: :math:`T_t > 0`, if different from :math:`T_s` (the official code has a
            temperature per side).
        mask: optional ``[...]`` boolean; False rows (padding, prompt tokens) are ignored.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[...]``, 0 on masked rows).
        num_valid: with ``"mean"``, divide the sum by this global count of valid rows instead.

    Returns:
        A scalar, or ``[...]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 1.0, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
        >>> uld_loss(s, t)
        tensor(0.7674)
        >>> uld_loss(s, t, reduction="none")
        tensor([0.8532, 0.6817])
    """
    check_reduction(reduction)
    check_temperature("temperature", temperature)
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    check_temperature("teacher_temperature", t_teacher)
    s, t, _, index, lead = flatten_rows(student_logits, teacher_logits.detach(), mask)
    p_s = torch.softmax(s / temperature, dim=-1).sort(dim=-1, descending=True).values  # (N, V_s)
    p_t = torch.softmax(t / t_teacher, dim=-1).sort(dim=-1, descending=True).values  # (N, V_t)
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    per_row = (p_s - p_t).abs().sum(-1)
    return reduce_rows(per_row, index, lead, reduction, num_valid)


def _span_sums(token_logp: Tensor, span: Tensor, num_spans: int, side: str) -> tuple[Tensor, Tensor]:
    """``(sums [R, S], counts [R, S])``: per row, the sum of the token log-probabilities of each span
    id in ``[0, num_spans)`` and the number of tokens with that id (tokens with id -1 are ignored)."""
    if token_logp.shape != span.shape:
        raise ValueError(
            f"{side}_span has shape {tuple(span.shape)}; expected the shape of {side}_token_logp "
            f"{tuple(token_logp.shape)} (one span id per token)"
        )
    if span.is_floating_point() or span.is_complex() or span.dtype == torch.bool:
        raise ValueError(f"{side}_span must hold integer span ids; got dtype {span.dtype}")
    span = span.reshape(-1, span.shape[-1]).long()
    logp = token_logp.reshape(-1, token_logp.shape[-1])
    if span.numel() and bool(((span < -1) | (span >= num_spans)).any()):
        bad = span[(span < -1) | (span >= num_spans)][0].item()
        raise ValueError(
            f"{side}_span holds id {bad}, outside [0, num_spans={num_spans}); tokens outside every span "
            "must hold -1"
        )
    inside = span >= 0
    ids = torch.where(inside, span, num_spans)  # tokens outside every span go to an extra, dropped column
    values = torch.where(inside, logp, torch.zeros_like(logp))
    sums = logp.new_zeros(logp.shape[0], num_spans + 1).scatter_add(1, ids, values)
    counts = torch.zeros(logp.shape[0], num_spans + 1, dtype=torch.long, device=logp.device)
    counts = counts.scatter_add(1, ids, inside.long())
    return sums[:, :num_spans], counts[:, :num_spans]


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``: ``log1p(-exp(x))`` far from 0, ``log(-expm1(x))`` near it."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _span_divergence(log_t: Tensor, log_s: Tensor, kind: str, tau: float) -> Tensor:
    """Elementwise divergence between teacher and student span log-likelihoods (both ``<= 0``)."""
    if kind == "abs":
        return (log_t - log_s).abs()
    a = log_t / tau - _BINARY_EPS  # log of the teacher's binarised probability
    b = log_s / tau - _BINARY_EPS
    p = torch.exp(a)
    not_p = -torch.expm1(a)  # 1 - p, accurate near p = 1
    log_not_q = _log1mexp(b)
    if kind == "binary_ce":
        return -(p * b + not_p * log_not_q)
    return p * (a - b) + not_p * (_log1mexp(a) - log_not_q)


def span_likelihood_loss(
    student_token_logp: Tensor,
    teacher_token_logp: Tensor,
    student_span: Tensor,
    teacher_span: Tensor,
    num_spans: int,
    *,
    kind: str = "binary_kl",
    binarization_temperature: float = 100.0,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
) -> Tensor:
    r"""Approximate Likelihood Matching: a binarised divergence between aligned spans' likelihoods.

    From "Cross-Tokenizer Distillation via Approximate Likelihood Matching" (Minixhofer et al., 2025;
    later versions: "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching").
    Each model's log-likelihood of an aligned span :math:`k` (the same characters, tokenized
    differently) is the sum of the log-probabilities of its tokens,
    :math:`\ell_S(k) = \sum_{i \in k} \log p_S(x_i \mid x_{<i})` and likewise :math:`\ell_T(k)`. With
    the binarisation temperature :math:`\tau`, :math:`a = \ell_T / \tau - \epsilon` and
    :math:`b = \ell_S / \tau - \epsilon` are the log-probabilities of two Bernoulli variables
    (:math:`p = e^{a} = p_T^{1/\tau}`, :math:`q = e^{b}`; :math:`\epsilon = 10^{-6}`), and the default
    ``kind="binary_kl"`` is their KL divergence:

    .. math::

        \mathcal{L}_k = e^{a} (a - b) + (1 - e^{a}) \left(\log(1 - e^{a}) - \log(1 - e^{b})\right)
        = \mathrm{KL}\left(\mathrm{Bern}(p) \,\|\, \mathrm{Bern}(q)\right)

    computed in log space: :math:`1 - e^{a}` as ``-expm1(a)`` and :math:`\log(1 - e^{x})` as
    ``log1p(-exp(x))`` below :math:`\log \frac{1}{2}` and ``log(-expm1(x))`` above it (accurate for a
    span of probability near 1). The :math:`\epsilon` shift, taken from the official code, keeps
    :math:`\log(1 - e^{x})` finite for a span of probability exactly 1; both sides are shifted alike,
    so equal span likelihoods still give exactly 0.

    **What the official code does, and what this function does.** The official implementation
    (``compute_alm_loss`` in ``tokenkit``) defaults to ``alm_diff_fn="binary_ce"`` with
    ``binarization_temp=100``: the binary *cross-entropy*
    :math:`-(e^{a} b + (1 - e^{a}) \log(1 - e^{b}))`. That is the binary KL above plus the entropy of
    the teacher's Bernoulli variable, a constant for the student: the two have identical gradients,
    but only the KL is 0 when the likelihoods agree. So the default here is the KL (the divergence the
    paper writes), and ``kind="binary_ce"`` gives the official value exactly. ``kind="abs"`` is the
    official ``"abs"`` option, :math:`|\ell_T - \ell_S|` (no :math:`\tau`). The official code clips
    the span sums at 0 (as here) and, by default, weights every span alike and divides by the global
    number of spans (``"mean"`` with ``num_valid`` here). Its other parts are outside this function:
    how the spans are chosen and merged (``alm_mode``: merging by the teacher's probability of a
    following space, appending that space's probability, chunk sizes), and the cross-tokenizer
    hidden-state term.

    **Span ids.** ``student_span[..., i]`` is the id of the span that the token whose log-probability
    is ``student_token_logp[..., i]`` belongs to (-1: none), so span ids follow the log-probability
    positions (shifted by one from ``input_ids`` when those come from next-token logits). A span
    counts when it has at least one token on each side; a span with tokens on one side only (one
    sequence cut short) is ignored.

    Args:
        student_token_logp: ``[..., L_s]`` the student's log-probabilities of the chosen next tokens
            (already gathered from its log-softmax). Receives the gradient.
        teacher_token_logp: ``[..., L_t]`` the teacher's, same leading shape. Detached.
        student_span: ``[..., L_s]`` integer span ids in ``[0, num_spans)``, or -1.
        teacher_span: ``[..., L_t]`` integer span ids in ``[0, num_spans)``, or -1.
        num_spans: :math:`S`, the number of span ids per row (the largest id + 1, or more).
        kind: ``"binary_kl"`` (default), ``"binary_ce"`` (the official default's value) or ``"abs"``.
        binarization_temperature: :math:`\tau > 0` (100 in the official configurations).
        reduction: ``"mean"`` over valid spans, ``"sum"``, or ``"none"`` (``[..., S]``, 0 on spans that
            do not count).
        num_valid: with ``"mean"``, divide the sum by this (global) number of valid spans instead.

    Returns:
        A scalar, or ``[..., S]`` with ``reduction="none"``. Computed in float32 (float64 inputs stay
        float64). With no valid span the mean is 0 with a zero gradient.

    Example:
        >>> import torch
        >>> s_logp = torch.tensor([[-0.5, -1.0, -0.2, -2.0]])  # 4 student tokens
        >>> t_logp = torch.tensor([[-1.2, -0.4, -1.5]])  # 3 teacher tokens
        >>> s_span, t_span = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1]])
        >>> span_likelihood_loss(s_logp, t_logp, s_span, t_span, 2, binarization_temperature=1.0)
        tensor(0.0117)
        >>> loss = span_likelihood_loss(s_logp, t_logp, s_span, t_span, 2)  # tau = 100
        >>> f"{loss.item():.3e}"
        '2.664e-04'
        >>> span_likelihood_loss(s_logp, t_logp, s_span, t_span, 2, kind="abs", reduction="none")
        tensor([[0.3000, 0.3000]])
    """
    check_reduction(reduction)
    if kind not in SPAN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SPAN_KINDS)}; got {kind!r}")
    check_temperature("binarization_temperature", binarization_temperature)
    if isinstance(num_spans, bool) or not isinstance(num_spans, int) or num_spans < 0:
        raise ValueError(f"num_spans must be an integer >= 0; got {num_spans!r}")
    for name, x in (("student_token_logp", student_token_logp), ("teacher_token_logp", teacher_token_logp)):
        if not x.is_floating_point() or x.dim() < 1:
            raise ValueError(
                f"{name} must be a floating-point [..., L] tensor; got {x.dtype} {tuple(x.shape)}"
            )
    lead = student_token_logp.shape[:-1]
    if teacher_token_logp.shape[:-1] != lead:
        raise ValueError(
            f"student_token_logp {tuple(student_token_logp.shape)} and teacher_token_logp "
            f"{tuple(teacher_token_logp.shape)} differ in their leading (sequence) dimensions"
        )
    dtype = compute_dtype(student_token_logp)
    s_sum, s_count = _span_sums(student_token_logp.to(dtype), student_span, num_spans, "student")
    t_sum, t_count = _span_sums(teacher_token_logp.detach().to(dtype), teacher_span, num_spans, "teacher")
    valid = (s_count > 0) & (t_count > 0)  # (R, S)
    # Spans that do not count get a harmless stand-in, so that no NaN reaches the backward pass.
    stand_in = torch.full_like(s_sum, -1.0)
    log_s = torch.where(valid, s_sum.clamp_max(0.0), stand_in)
    log_t = torch.where(valid, t_sum.clamp_max(0.0), stand_in)
    per_span = _span_divergence(log_t, log_s, kind, binarization_temperature)  # (R, S)
    index = valid.reshape(-1).nonzero().squeeze(-1)
    per_valid = per_span.reshape(-1).index_select(0, index)
    return reduce_rows(per_valid, index, torch.Size((*lead, num_spans)), reduction, num_valid)
