"""Generation-based metrics of language-model students."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distillery import functional as DF
from distillery.data.text.collate import encode_texts, special_ids
from distillery.generation.sampling import build_batch, generate_completions
from distillery.models.hf import HFCausalLMAdapter


@torch.no_grad()
def teacher_scored_nll(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    r"""Mean NLL per token that the teacher assigns to the student's own samples.

    .. math::

        \frac{1}{\sum_i |y_i|} \sum_i \sum_t -\log p_T(y_{i,t} \mid x_i, y_{i,<t}),
        \quad y_i \sim p_S(\cdot \mid x_i)

    The measure of on-policy distillation ("On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes"): low when the student generates what the teacher finds likely.
    """
    pad_id, bos_id, _ = special_ids(tokenizer)
    adapter = HFCausalLMAdapter()
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = [[bos_id, *ids] for ids in encode_texts(tokenizer, prompts[start : start + batch_size])]
        completions = generate_completions(
            student, rows, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start
        )
        batch = build_batch(rows, completions, pad_id=pad_id)
        was_training = teacher.training
        teacher.eval()
        logits = adapter.forward(teacher, batch).logits.float()  # (B, T-1, V)
        teacher.train(was_training)
        target, mask = adapter.rows(batch)
        total += float(DF.cross_entropy(logits, target, mask=mask, reduction="sum"))
        count += int(mask.sum())
    return total / max(count, 1)
