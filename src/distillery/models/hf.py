"""Adapters for Hugging Face ``transformers`` models."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from distillery.models.adapters import ModelOutput


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
    """

    target_key = "labels"

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        target = batch[self.target_key][:, 1:]  # (B, T-1)
        return target, target != -100

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return ModelOutput(logits=out.logits[:, :-1])  # (B, T-1, V)

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


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
