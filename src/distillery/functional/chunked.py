"""Logit divergences computed from hidden states and LM heads, chunk by chunk over the tokens.

For language models the ``[tokens, vocab]`` logits dominate the memory of distillation: at 4,096
tokens and a 128k vocabulary one float32 copy is 2 GiB, and a divergence with its backward pass
keeps several such tensors (both models' logits, their log-softmax, probabilities, gradients)
alive at once. :func:`chunked_kd_from_hidden` never builds them: it takes the final hidden states
and the LM head weights of both models and evaluates the divergence a chunk of tokens at a time,
computing the student's gradients in the forward pass, so only one chunk's logits exist at any
moment. Use :func:`should_chunk` to decide when this pays off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distillery.functional._rows import check_reduction, check_targets, check_temperature, compute_dtype
from distillery.functional.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

# Name -> (logit divergence, the extra keyword parameters it accepts). The short names are the loss
# term names of the recipes; the long ones are the functions' own names.
DIVERGENCES: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "forward_kl": (forward_kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "jsd": (generalized_jsd, ("beta",)),
    "generalized_jsd": (generalized_jsd, ("beta",)),
    "tvd": (total_variation, ()),
    "total_variation": (total_variation, ()),
    "skew_kl": (skew_kl, ("alpha",)),
    "skew_reverse_kl": (skew_reverse_kl, ("alpha",)),
}

# Default of :func:`should_chunk`: chunk once one model's float32 logits would exceed 2**24 values
# (64 MiB).
CHUNK_THRESHOLD = 2**24


def should_chunk(num_tokens: int, vocab_size: int, threshold: int = CHUNK_THRESHOLD) -> bool:
    """Whether the logits are large enough for :func:`chunked_kd_from_hidden` to pay off.

    True when ``num_tokens * vocab_size > threshold``. The default threshold, ``2**24`` values (one
    model's float32 logits take 64 MiB), is where the naive loss starts to keep several hundred MiB
    of logit-sized tensors alive (both models' logits, log-probabilities, probabilities and the
    gradient), while the chunked loss's per-call overhead is still negligible; below it the plain
    logit functions are as good. Callers pass the number of valid tokens of the batch.

    Example:
        >>> should_chunk(4096, 32_000)
        True
        >>> should_chunk(64, 32_000)
        False
    """
    return num_tokens * vocab_size > threshold


def _resolve_divergence(divergence: str, kwargs: dict) -> Callable[..., Tensor]:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(sorted(DIVERGENCES))}")
    fn, params = DIVERGENCES[divergence]
    extra = sorted(set(kwargs) - set(params))
    if extra:
        takes = f"only {', '.join(params)}" if params else "no extra parameters"
        raise ValueError(f"divergence {divergence!r} takes {takes}; got {', '.join(extra)}")
    return fn


def _check_head(side: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{side}_head_weight must be [vocab, hidden] (like nn.Linear.weight); "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden has shape {tuple(hidden.shape)} but {side}_head_weight is "
            f"{tuple(weight.shape)}; the hidden size (last dim) must equal the weight's dim 1"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{side}_head_bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},), one per "
            "vocabulary entry"
        )


def _shared_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            shared = min(student_vocab, teacher_vocab)
            raise ValueError(
                f"student head has {student_vocab} classes but teacher head has {teacher_vocab}; if "
                f"one vocabulary is a padded copy of the other, pass vocab_size={shared} to compare "
                "the shared part"
            )
        return student_vocab
    for side, v in (("student", student_vocab), ("teacher", teacher_vocab)):
        if v < vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is larger than the {side}'s {v} classes; pass the size of "
                "the shared vocabulary (at most the smaller of the two)"
            )
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1; got {vocab_size}")
    return vocab_size


def _matmul_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# loss_of_chunk(student logits [c, V] in the compute dtype, start, stop) -> summed loss of rows [start, stop)
ChunkLoss = Callable[[Tensor, int, int], Tensor]


def _chunk_loop(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Tensor | None,
    loss_of_chunk: ChunkLoss,
    vocab: int,
    scale: Tensor | float,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss ``sum * scale`` over the rows of ``h_s`` and, where ``needs``, its gradients.

    ``loss_of_chunk`` gets each chunk's student logits (restricted to the first ``vocab`` classes)
    and returns the chunk's summed loss; anything else it needs (teacher logits, targets) it computes
    itself from the row range. ``needs`` says which of the student's (hidden, weight, bias) gradients
    to compute. The gradients come back as ``[n, H_s]`` in ``h_s.dtype``, ``[V_s, H_s]`` and ``[V_s]``
    in the compute dtype; rows of the head beyond ``vocab`` get a zero gradient.
    """
    n = h_s.shape[0]
    cdtype = compute_dtype(h_s)
    mm_s = _matmul_dtype(h_s, w_s, b_s)
    # The head restricted to the shared vocabulary: padded rows are never multiplied.
    ws = w_s.detach()[:vocab].to(mm_s)
    bs = None if b_s is None else b_s.detach()[:vocab].to(mm_s)
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(h_s) if need_h else None
    grad_w = w_s.new_zeros(w_s.shape, dtype=cdtype) if need_w else None
    grad_b = w_s.new_zeros(w_s.shape[0], dtype=cdtype) if need_b else None
    total = torch.zeros((), dtype=cdtype, device=h_s.device)
    # The normaliser enters the backward pass as the loss's incoming gradient, as a scalar (as in
    # the naive ``sum / count``), not as an extra pass over the chunk's logits.
    scale = torch.as_tensor(scale, dtype=cdtype, device=h_s.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        hs = h_s[start:stop].detach().to(mm_s)  # (c, H_s)
        with torch.no_grad():
            s = F.linear(hs, ws, bs).to(cdtype)  # (c, V)
        if not any(needs):
            with torch.no_grad():
                total += loss_of_chunk(s, start, stop)
            continue
        s.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_of_chunk(s, start, stop)
        (g,) = torch.autograd.grad(loss, s, grad_outputs=scale)  # (c, V): d (loss * scale) / d s
        total += loss.detach()
        del s, loss
        if need_b:
            grad_b[:vocab] += g.sum(0)
        g = g.to(mm_s)
        if need_h:
            grad_h[start:stop] = g @ ws  # (c, H_s)
        if need_w:
            if g.dtype == cdtype:
                grad_w[:vocab].addmm_(g.t(), hs)
            else:  # reduced-precision matmul, accumulated in float32 across chunks
                grad_w[:vocab] += (g.t() @ hs).to(cdtype)
        del g
    return total * scale, grad_h, grad_w, grad_b


class _Chunked(torch.autograd.Function):
    """Loss in forward; the student's gradients, computed in forward too, are replayed in backward."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, loss_of_chunk, vocab, scale, chunk_size, needs):
        loss, grad_h, grad_w, grad_b = _chunk_loop(
            h_s, w_s, b_s, loss_of_chunk, vocab, scale, chunk_size, needs
        )
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.needs = needs
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = []
        for need, dtype in zip(ctx.needs, ctx.dtypes):
            if not need:
                grads.append(None)
                continue
            grads.append((next(saved) * grad_output).to(dtype))
        return (*grads, None, None, None, None, None)


def _scale(
    reduction: str, num_valid: Tensor | float | None, rows: int, dtype: torch.dtype, device
) -> Tensor | float:
    """The factor turning the summed loss into the requested reduction."""
    if reduction == "sum":
        return 1.0
    if num_valid is None:
        return 1.0 / max(rows, 1)
    if isinstance(num_valid, Tensor):
        return 1.0 / num_valid.to(device=device, dtype=dtype).clamp_min(1)
    return 1.0 / max(float(num_valid), 1.0)


def _apply(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, loss_of_chunk: ChunkLoss, vocab: int,
           scale: Tensor | float, chunk_size: int, hidden: Tensor) -> Tensor:  # fmt: skip
    params = (hidden, w_s, b_s)
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in params)
    if not any(needs):
        return _chunk_loop(h_s, w_s, b_s, loss_of_chunk, vocab, scale, chunk_size, needs)[0]
    return _Chunked.apply(h_s, w_s, b_s, loss_of_chunk, vocab, scale, chunk_size, needs)


def _check_reduction_and_chunk(reduction: str, chunk_size: int, name: str) -> None:
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError(
            f'{name} supports reduction "mean" or "sum", not "none": per-token losses '
            "cannot be backpropagated from the gradients precomputed chunk by chunk; call the "
            "loss on the logits of a slice of the tokens for per-token values"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")


def chunked_kd_from_hidden(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 256,
    **divergence_kwargs: float,
) -> Tensor:
    r"""A logit divergence between two LM heads, without materialising the ``[tokens, vocab]`` logits.

    With :math:`s = h_s W_s^\top + b_s` and :math:`t = h_t W_t^\top + b_t` the logits of the student
    and the teacher at each token (row), this returns exactly

    .. math::

        \mathcal{L} = \frac{1}{N_{\mathrm{valid}}} \sum_{i\ \mathrm{valid}} D_T(s_i, t_i)

    (or the plain sum), where :math:`D_T` is one of the logit divergences of
    :mod:`distillery.functional.divergences` at temperature :math:`T` (already scaled by
    :math:`T^2`). The valid tokens are processed ``chunk_size`` at a time: each chunk's logits are
    computed, the divergence is evaluated on them with ``reduction="sum"``, its gradient with
    respect to the student's logits is taken at once and turned into the chunk's gradients of the
    student hidden states, head weight and bias, and the chunk's logits are freed before the next
    chunk. The backward pass only multiplies the stored gradients by the incoming gradient. This is
    the chunked fused-linear-loss idea of "Liger Kernel: Efficient Triton Kernels for LLM Training"
    (Hsu et al.), applied here to distillation divergences in plain PyTorch.

    **Memory:** the logit-sized working set is :math:`O(\text{chunk\_size} \times V)` instead of
    :math:`O(\text{tokens} \times V)`; beyond it the call holds the student gradients (the size of
    the hidden states and of the head), which the backward pass would allocate anyway. The compute
    is the same as the naive loss (one forward and one backward matmul per chunk).

    **Teacher:** the teacher's hidden states, weight and bias are treated as constants (its logits
    are computed under ``no_grad``) and never receive a gradient, even if they require one.

    **Precision:** the head matmuls run in the inputs' dtype (bf16 hidden states and heads multiply
    in bf16, as ``nn.Linear`` would); each chunk's logits are cast to float32 and the divergence and
    its gradient are computed in float32 (float64 inputs stay float64). The head weight and bias
    gradients are accumulated across chunks in float32; all gradients are returned in the inputs'
    dtypes. The result equals the naive ``divergence(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t)`` up to
    float32 rounding.

    ``reduction="none"`` is not supported: the per-token losses cannot be backpropagated from
    gradients precomputed in the forward pass (the head's gradient is a sum over tokens). For
    per-token values, call the divergence on the logits of a slice of the tokens.

    Args:
        student_hidden: ``[..., H_s]`` the student's final hidden states; the leading dims
            (batch, sequence) are flattened into tokens.
        student_head_weight: ``[V_s, H_s]`` the student's LM head (an ``nn.Linear.weight``).
        teacher_hidden: ``[..., H_t]`` the teacher's final hidden states (the same leading shape).
        teacher_head_weight: ``[V_t, H_t]`` the teacher's LM head.
        divergence: one of ``forward_kl``, ``reverse_kl``, ``jsd`` (also ``generalized_jsd``;
            takes ``beta``), ``tvd`` (also ``total_variation``), ``skew_kl`` and ``skew_reverse_kl``
            (take ``alpha``).
        temperature: softening temperature :math:`T > 0` applied to both sides.
        student_head_bias: optional ``[V_s]`` bias of the student's head.
        teacher_head_bias: optional ``[V_t]`` bias of the teacher's head.
        mask: optional ``[...]`` boolean over the leading dims; False tokens (padding, prompt) are
            skipped entirely and get a zero gradient.
        reduction: ``"mean"`` over valid tokens or ``"sum"``.
        num_valid: with ``"mean"``, divide the sum by this count instead (the global number of valid
            tokens across gradient-accumulation steps and data-parallel ranks).
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies, or a teacher
            whose vocabulary extends the student's); the heads' rows beyond it are never multiplied
            and get a zero gradient. Required when ``V_s != V_t``.
        chunk_size: tokens per chunk (>= 1). The peak holds several (six to ten, depending on the
            divergence) ``[chunk_size, V]`` float32 tensors: at the default 256 and a 32k vocabulary
            each is 32 MiB. Smaller chunks are also faster on CPU (the chunk stays closer to the
            caches); on GPUs with large hidden sizes, larger chunks (512 to 1024) amortise re-reading
            the heads once per chunk.
        **divergence_kwargs: the divergence's own parameter, ``beta`` or ``alpha``.

    Returns:
        A scalar in float32 (float64 for float64 inputs). With no valid token it is 0 with zero
        gradients.

    Example:
        >>> import torch
        >>> from distillery.functional import forward_kl
        >>> h_s = torch.arange(24.0).reshape(2, 3, 4).sin().requires_grad_()
        >>> w_s = torch.arange(40.0).reshape(10, 4).cos().requires_grad_()
        >>> h_t, w_t = torch.arange(36.0).reshape(2, 3, 6).cos(), torch.arange(60.0).reshape(10, 6).sin()
        >>> loss = chunked_kd_from_hidden(h_s, w_s, h_t, w_t, temperature=2.0, chunk_size=4)
        >>> round(loss.item(), 4)
        2.2393
        >>> loss.backward()
        >>> naive = forward_kl(h_s @ w_s.T, h_t @ w_t.T, temperature=2.0)
        >>> bool(torch.allclose(loss, naive))
        True
    """
    _check_reduction_and_chunk(reduction, chunk_size, "chunked_kd_from_hidden")
    check_temperature("temperature", temperature)
    fn = _resolve_divergence(divergence, divergence_kwargs)
    _check_head("student", student_hidden, student_head_weight, student_head_bias)
    _check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} differ in their leading (token) dimensions"
        )
    vocab = _shared_vocab(student_head_weight.shape[0], teacher_head_weight.shape[0], vocab_size)
    cdtype = compute_dtype(student_hidden)
    # Check the divergence's parameters (beta, alpha) even when no token is valid.
    empty = student_hidden.new_zeros((0, 1), dtype=cdtype)
    fn(empty, empty, temperature=temperature, reduction="sum", **divergence_kwargs)

    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    index = _valid_rows(mask, lead)
    if index is not None:
        h_s, h_t = h_s.index_select(0, index), h_t.index_select(0, index)

    # The teacher is a constant: its head (shared vocabulary only) multiplies under no_grad.
    mm_t = _matmul_dtype(h_t, teacher_head_weight, teacher_head_bias)
    wt = teacher_head_weight.detach()[:vocab].to(mm_t)
    bt = None if teacher_head_bias is None else teacher_head_bias.detach()[:vocab].to(mm_t)
    h_t = h_t.detach().to(mm_t)

    def loss_of_chunk(s: Tensor, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            t = F.linear(h_t[start:stop], wt, bt).to(s.dtype)  # (c, V)
        return fn(s, t, temperature=temperature, reduction="sum", **divergence_kwargs)

    scale = _scale(reduction, num_valid, h_s.shape[0], cdtype, h_s.device)
    return _apply(
        h_s, student_head_weight, student_head_bias, loss_of_chunk, vocab, scale, chunk_size, student_hidden
    )


def _check_mask(mask: Tensor | None, lead: torch.Size) -> None:
    if mask is not None and mask.shape != lead:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected the hidden states' leading shape {tuple(lead)}"
        )


def _valid_rows(mask: Tensor | None, lead: torch.Size) -> Tensor | None:
    """Indices of the True rows of ``mask`` (flattened), or None without a mask."""
    _check_mask(mask, lead)
    return None if mask is None else mask.reshape(-1).to(torch.bool).nonzero().squeeze(-1)


def chunked_cross_entropy_from_hidden(
    hidden: Tensor,
    head_weight: Tensor,
    target: Tensor,
    *,
    head_bias: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int = 256,
) -> Tensor:
    r"""Next-token cross-entropy from hidden states and an LM head, chunk by chunk over the tokens.

    With :math:`s_i = h_i W^\top + b` the logits of token row :math:`i`, this returns exactly
    :func:`distillery.functional.cross_entropy` of those logits,

    .. math::

        \mathcal{L} = -\frac{1}{N} \sum_{i:\, y_i \neq \text{ignore}} \log \mathrm{softmax}(s_i)_{y_i}

    (with label smoothing :math:`\varepsilon`, the target is :math:`(1-\varepsilon)\,\text{onehot}(y)
    + \varepsilon / V`), without ever holding the ``[tokens, vocab]`` logits: the supervised half of
    a distillation objective, computed the way :func:`chunked_kd_from_hidden` computes the divergence
    (the chunked linear-cross-entropy of "Liger Kernel: Efficient Triton Kernels for LLM Training",
    Hsu et al., in plain PyTorch). Memory, precision and the ``reduction="none"`` restriction are
    those of :func:`chunked_kd_from_hidden`.

    Args:
        hidden: ``[..., H]`` final hidden states; the leading dims are flattened into tokens.
        head_weight: ``[V, H]`` the LM head (an ``nn.Linear.weight``).
        target: ``[...]`` next-token ids, ``ignore_index`` where there is no target.
        head_bias: optional ``[V]`` bias of the head.
        mask: optional ``[...]`` boolean; False tokens are skipped and get a zero gradient.
        reduction: ``"mean"`` over labelled valid tokens or ``"sum"``.
        num_valid: with ``"mean"``, divide the sum by this (global) count instead.
        ignore_index: target value of tokens without a label.
        label_smoothing: :math:`\varepsilon \in [0, 1)`.
        chunk_size: tokens per chunk (>= 1).

    Returns:
        A scalar in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from distillery.functional import cross_entropy
        >>> h = torch.arange(24.0).reshape(2, 3, 4).sin().requires_grad_()
        >>> w = torch.arange(40.0).reshape(10, 4).cos().requires_grad_()
        >>> y = torch.tensor([[1, 7, -100], [0, 9, 3]])
        >>> loss = chunked_cross_entropy_from_hidden(h, w, y, chunk_size=2)
        >>> round(loss.item(), 4)
        2.4891
        >>> bool(torch.allclose(loss, cross_entropy(h @ w.T, y)))
        True
    """
    _check_reduction_and_chunk(reduction, chunk_size, "chunked_cross_entropy_from_hidden")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}")
    _check_head("student", hidden, head_weight, head_bias)
    lead = hidden.shape[:-1]
    if target.shape != lead:
        raise ValueError(
            f"target has shape {tuple(target.shape)}; expected the hidden states' leading shape {tuple(lead)}"
        )
    _check_mask(mask, lead)
    rows = target != ignore_index
    if mask is not None:
        rows &= mask.to(torch.bool)
    index = rows.reshape(-1).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    y = check_targets(target.reshape(-1).index_select(0, index), head_weight.shape[0])

    def loss_of_chunk(s: Tensor, start: int, stop: int) -> Tensor:
        return F.cross_entropy(s, y[start:stop], reduction="sum", label_smoothing=label_smoothing)

    scale = _scale(reduction, num_valid, h.shape[0], compute_dtype(hidden), h.device)
    return _apply(h, head_weight, head_bias, loss_of_chunk, head_weight.shape[0], scale, chunk_size, hidden)
