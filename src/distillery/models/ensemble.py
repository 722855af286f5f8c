"""Several models whose averaged prediction acts as one model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distillery.functional import mean_probability_logits


class Ensemble(nn.Module):
    """Runs every member on the same input and returns logits of the mean predicted probability."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        return mean_probability_logits(torch.stack([m(x) for m in self.members]))  # (B, C)
