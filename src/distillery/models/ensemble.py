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


class CausalLMEnsemble(Ensemble):
    """Causal LMs (``transformers``) as one: the logits of the members' (weighted) mean next-token
    probabilities, in a ``CausalLMOutput``. It has no ``generate``: a task evaluates its likelihoods only.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> lm = CausalLMEnsemble([transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)])
        >>> lm(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 10])
    """

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        logits = torch.stack(
            [
                m(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float()
                for m in self.members
            ]
        )  # (K, B, T, V)
        weights = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
        return CausalLMOutput(logits=mean_probability_logits(logits, weights))
