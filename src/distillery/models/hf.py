"""Adapters for Hugging Face ``transformers`` models."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from distillery.capture import Capture, unwrap_model
from distillery.models.adapters import LM_HEAD_BIAS, LM_HEAD_WEIGHT, LM_HIDDEN, ModelOutput


class HFSequenceClassifierAdapter:
    """Batches ``{"input_ids", "attention_mask", "labels"}`` for ``AutoModelForSequenceClassification``."""

    target_key = "labels"

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        target = batch[self.target_key]
        return target, torch.ones_like(target, dtype=torch.bool)

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return ModelOutput(logits=out.logits)

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


class HFCausalLMAdapter:
    """Batches ``{"input_ids", "attention_mask", "labels"}`` for ``AutoModelForCausalLM``.

    Rows are token positions: the logits at position i predict token i+1, so logits are shifted left
    and labels right; positions whose label is -100 (prompt, padding) are masked out.

    With ``hidden_states=True`` (a chunked loss) the output carries no logits: the model runs with
    ``logits_to_keep=1`` (its head multiplies only the last position), the final hidden states are
    read from its base model with a forward hook, and the output holds them (shifted like the logits)
    together with the LM head's weight and bias, for the loss to turn into logits chunk by chunk.
    See :func:`chunked_loss_support` for the models this applies to.
    """

    target_key = "labels"

    def __init__(self, hidden_states: bool = False) -> None:
        self.hidden_states = hidden_states

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        target = batch[self.target_key][:, 1:]  # (B, T-1)
        return target, target != -100

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        if not self.hidden_states:
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            return ModelOutput(logits=out.logits[:, :-1])  # (B, T-1, V)
        raw = unwrap_model(model)
        path = raw.base_model_prefix
        with Capture(model, path) as cap:
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_to_keep=1)
        base = cap.outputs[path]
        hidden = base.last_hidden_state if hasattr(base, "last_hidden_state") else base[0]  # (B, T, H)
        head = raw.get_output_embeddings()
        features = {LM_HIDDEN: hidden[:, :-1], LM_HEAD_WEIGHT: head.weight}  # (B, T-1, H), (V, H)
        if getattr(head, "bias", None) is not None:
            features[LM_HEAD_BIAS] = head.bias  # (V,)
        return ModelOutput(logits=None, features=features)

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


def chunked_loss_support(model: nn.Module) -> str | None:
    """Why the chunked loss cannot be computed for ``model`` from its hidden states, or None if it can.

    It can when the model's logits are exactly ``head(last_hidden_state)``: a ``transformers`` causal
    LM whose forward takes ``logits_to_keep``, whose base model (``base_model_prefix``) returns the
    final (normalised) hidden states, whose output embeddings are an ``nn.Linear``, and whose config
    applies no transformation after the head (logit soft-capping as in Gemma 2, a logit scale as in
    Cohere).
    """
    raw = unwrap_model(model)
    name = type(raw).__name__
    if "logits_to_keep" not in inspect.signature(raw.forward).parameters:
        return f"{name}.forward takes no logits_to_keep argument"
    prefix = getattr(raw, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(raw, prefix, None), nn.Module):
        return f"{name} has no base model at base_model_prefix={prefix!r}"
    head = raw.get_output_embeddings() if hasattr(raw, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{name}'s output embeddings are not an nn.Linear"
    config = getattr(raw, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"{name} transforms its logits after the head ({attr}={value})"
    return None


# task name -> (transformers auto class name, adapter); transformers is imported on first use.
HF_TASKS = {
    "sequence-classification": ("AutoModelForSequenceClassification", HFSequenceClassifierAdapter),
    "causal-lm": ("AutoModelForCausalLM", HFCausalLMAdapter),
}


def hf_task(task: str):
    """``(auto class, adapter class)`` for a task name of :data:`HF_TASKS`."""
    if task not in HF_TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(sorted(HF_TASKS))}")
    import transformers

    auto_name, adapter = HF_TASKS[task]
    return getattr(transformers, auto_name), adapter
