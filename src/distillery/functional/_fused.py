r"""Row divergences with closed-form gradients: one autograd node instead of a dozen.

Composed from ``log_softmax``, ``exp``, ``logaddexp`` and ``where``, a divergence over ``[N, C]``
logits records every intermediate for the backward pass; with a language model's vocabulary
(``C`` = 32k-256k) those passes over ``N x C`` values, not the matrix products, dominate a
distillation step. Every divergence here depends on the student only through its log-probabilities
:math:`\ell_s = \log\mathrm{softmax}(z_s)`, ``z_s = s / T``, so its gradient is

.. math::

    \frac{\partial \mathcal{L}}{\partial s} = T \left( g - p_s \textstyle\sum_c g_c \right),
    \qquad g = \frac{\partial\, T^{-2}\mathcal{L}}{\partial \ell_s},

with a short closed form for ``g`` (derived per divergence below; ``m`` is the mixture of the
divergence, ``\ell_m = \log m``):

* forward KL :math:`\mathrm{KL}(p_t\|p_s)`: ``g = -p_t``, so the gradient is ``T (p_s - p_t)``;
* reverse KL :math:`\mathrm{KL}(p_s\|p_t)`: ``g = p_s (\ell_s - \ell_t + 1)``;
* generalized JSD(beta), ``m = beta p_t + (1 - beta) p_s``: ``g = (1 - beta) p_s (\ell_s - \ell_m)``;
* skew KL(alpha), :math:`\mathrm{KL}(p_t\|m)`, ``m = alpha p_t + (1 - alpha) p_s``:
  ``g = -(1 - alpha) p_t p_s / m``;
* skew reverse KL(alpha), :math:`\mathrm{KL}(p_s\|m)`, ``m = alpha p_s + (1 - alpha) p_t``:
  ``g = p_s (\ell_s - \ell_m + 1 - alpha p_s / m)``.

The gradient is computed in the forward pass (only when the student's logits require one) and kept
as the node's single saved tensor. This path is taken when every logit is finite and the teacher's
logits need no gradient; anything else (``-inf`` slots, a trained teacher) goes through the composed
functions, whose floors at ``LOG_FLOOR`` define the values there. The node is differentiable once:
a second-order gradient through it (``create_graph=True``) raises with a pointer to
:func:`composed_gradients`, which switches this path off. With finite
logits those floors never act, so both paths compute the same function: the tests check values and
gradients against the composed path and against naive float64 loops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")

# False sends every call down the composed path (see composed_gradients).
enabled = True


@contextmanager
def composed_gradients() -> Iterator[None]:
    """Inside this block the divergences record the composed autograd graph instead of their
    closed-form gradient: slower and heavier, but differentiable to any order (use it for
    second-order gradients, e.g. gradient penalties through the distillation loss).

    Example:
        >>> import torch
        >>> from distillery.functional import forward_kl
        >>> s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        >>> t = torch.randn(2, 5, dtype=torch.float64)
        >>> with composed_gradients():
        ...     (g,) = torch.autograd.grad(forward_kl(s, t), s, create_graph=True)
        >>> g.requires_grad
        True
    """
    global enabled
    previous, enabled = enabled, False
    try:
        yield
    finally:
        enabled = previous


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``[N, C]`` tensors without an ``[N, C]`` temporary (one dot per row)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def _floor_(m: Tensor) -> Tensor:
    """A mixture floored in place at the smallest normal number: where it underflows to 0 both of
    its sides are 0 too, so every term it enters is multiplied by 0."""
    return m.clamp_min_(torch.finfo(m.dtype).tiny)


def _log_(m: Tensor) -> Tensor:
    """``log m`` in place, of the floored mixture."""
    return _floor_(m).log_()


def _rows(kind: str, s: Tensor, t: Tensor, temperature: float, weight: float, need_grad: bool):
    """``(per_row [N], gradient [N, C] or None)`` of ``T^2 * divergence`` for ``[N, C]`` logits.

    Written to allocate few ``[N, C]`` tensors: intermediates are overwritten in place once used.
    """
    T, w = temperature, weight
    zs, zt = (s, t) if T == 1.0 else (s / T, t / T)
    ls, lt = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
    del zs, zt
    grad = None
    if kind == "forward_kl":
        pt = lt.exp()
        value = _row_dot(pt, lt.sub_(ls))
        if need_grad:
            grad = ls.exp_().sub_(pt)  # p_s - p_t: here g = -p_t sums to -1 per row
    elif kind == "reverse_kl":
        ps = ls.exp()
        d = ls.sub_(lt)  # l_s - l_t
        value = _row_dot(ps, d)
        if need_grad:  # g = p_s (d + 1), sum g = value + 1
            grad = d.sub_(value.unsqueeze(-1)).mul_(ps)
    elif kind == "jsd":
        ps, pt = ls.exp(), lt.exp()
        lm = _log_(torch.add(pt * w, ps, alpha=1.0 - w))  # m = beta p_t + (1 - beta) p_s
        ds, dt = ls.sub_(lm), lt.sub_(lm)
        del lm
        student_part = _row_dot(ps, ds)
        value = w * _row_dot(pt, dt) + (1.0 - w) * student_part
        if need_grad:  # g = (1 - beta) p_s ds, sum g = (1 - beta) student_part
            grad = ds.mul_(1.0 - w).sub_((1.0 - w) * student_part.unsqueeze(-1)).mul_(ps)
    elif kind == "skew_kl":
        ps, pt = ls.exp(), lt.exp()
        m = torch.add(pt * w, ps, alpha=1.0 - w)  # m = alpha p_t + (1 - alpha) p_s
        value = _row_dot(pt, lt.sub_(_log_(m.clone())))
        if need_grad:
            g = pt.div_(_floor_(m)).mul_(ps).mul_(-(1.0 - w))
            grad = g.addcmul_(ps, g.sum(-1, keepdim=True), value=-1.0)
    elif kind == "skew_reverse_kl":
        ps, pt = ls.exp(), lt.exp()
        m = torch.add(ps * w, pt, alpha=1.0 - w)  # m = alpha p_s + (1 - alpha) p_t
        d = ls.sub_(_log_(m.clone()))
        value = _row_dot(ps, d)
        if need_grad:
            r = torch.div(ps, _floor_(m), out=pt).mul_(w)  # alpha p_s / m
            g = d.add_(1.0).sub_(r).mul_(ps)
            grad = g.addcmul_(ps, g.sum(-1, keepdim=True), value=-1.0)
    else:
        raise ValueError(f"unknown fused divergence {kind!r}; one of {', '.join(KINDS)}")
    if grad is not None and T != 1.0:
        grad.mul_(T)  # through s / T, times the T^2 scale
    return value * T**2, grad


class _FusedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, kind: str, temperature: float, weight: float) -> Tensor:
        per_row, grad = _rows(kind, s, t, temperature, weight, need_grad=True)
        ctx.save_for_backward(grad)
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): a graph of the gradient is wanted
            raise RuntimeError(
                "a second-order gradient through forward_kl / reverse_kl / generalized_jsd / skew_kl / "
                "skew_reverse_kl was asked for (create_graph=True), but their gradient is computed in "
                "closed form, first order only; compute the loss inside "
                "`with distillery.functional.composed_gradients():` to get a graph of any order"
            )
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(-1), None, None, None, None


def fused_rows(kind: str, s: Tensor, t: Tensor, temperature: float, weight: float = 0.0) -> Tensor | None:
    """Per-row ``T^2 * divergence`` of ``[N, C]`` logits with a closed-form gradient, or None when the
    composed path must be used instead (non-finite logits, a teacher that needs a gradient, an empty
    input or an end of the mixture weight, where the divergence reduces to another one).

    ``weight`` is ``beta`` for ``"jsd"`` and ``alpha`` for the skew divergences.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown fused divergence {kind!r}; one of {', '.join(KINDS)}")
    if not enabled or (kind in ("jsd", "skew_kl", "skew_reverse_kl") and not 0.0 < weight < 1.0):
        return None
    if s.numel() == 0 or (t.requires_grad and torch.is_grad_enabled()):
        return None
    # A sum is finite only if every term is (inf + -inf and nan give nan): one read-only pass each,
    # where isfinite().all() would allocate. A sum that overflows merely takes the composed path.
    if not bool(torch.isfinite(s.detach().sum() + t.detach().sum())):
        return None
    if torch.is_grad_enabled() and s.requires_grad:
        return _FusedRows.apply(s, t, kind, float(temperature), float(weight))
    return _rows(kind, s, t, float(temperature), float(weight), need_grad=False)[0]


__all__ = ["KINDS", "composed_gradients", "fused_rows"]
