"""Several models whose averaged prediction acts as one model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distillery.functional import mean_probability_logits


class Ensemble(nn.Module):
    """Runs every member on the same input and returns logits of the mean predicted probability.

    ``weights`` (optional, one non-negative number per member, normalised) makes it the weighted
    mean; they are not part of the state dict (an ensemble saved with weights loads without them).
    """

    def __init__(self, members: list[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if weights is not None and len(weights) != len(members):
            raise ValueError(
                f"{len(weights)} weights for {len(members)} ensemble members; give one per member"
            )
        self.members = nn.ModuleList(members)
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, x: Tensor) -> Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        logits = torch.stack([m(x) for m in self.members])  # (K, B, C)
        weights = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
        return mean_probability_logits(logits, weights)  # (B, C)
