"""Supervised terms that share the logit functions' row/mask/normaliser conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.functional._rows import check_reduction, flatten_rows, reduce_rows


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_valid: Tensor | float | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Cross-entropy with hard labels over the rows that have one.

    .. math::

        \mathcal{L} = -\frac{1}{N} \sum_{i:\, y_i \neq \text{ignore}} \log \mathrm{softmax}(s_i)_{y_i}

    (with label smoothing :math:`\varepsilon`, the target is :math:`(1-\varepsilon)\,\text{onehot}(y)
    + \varepsilon / C`). Rows whose target equals ``ignore_index`` (unlabelled transfer examples,
    prompt tokens) are not counted; ``"mean"`` divides by the number of labelled valid rows, or by
    ``num_valid`` when given.

    Args:
        logits: ``[..., C]`` logits.
        target: ``[...]`` integer class indices, ``ignore_index`` for rows without a label.
        mask: optional ``[...]`` boolean; False rows are ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_valid: global normaliser for ``"mean"`` (see :func:`distillery.functional.forward_kl`).
        ignore_index: target value of unlabelled rows.
        label_smoothing: :math:`\varepsilon \in [0, 1)`.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
        >>> cross_entropy(s, torch.tensor([0, 1, -100]))
        tensor(0.3964)
    """
    check_reduction(reduction)
    labelled = target != ignore_index
    mask = labelled if mask is None else (mask.to(torch.bool) & labelled)
    s, _, y, index, lead = flatten_rows(logits, None, mask, target=target)
    per_row = F.cross_entropy(s, y.long(), reduction="none", label_smoothing=label_smoothing)
    return reduce_rows(per_row, index, lead, reduction, num_valid)
