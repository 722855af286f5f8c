"""Metrics of language models: perplexity, next-token agreement, task accuracy of greedy answers,
and the teacher's NLL of a student's own samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from distillery import functional as DF
from distillery.data.text.collate import collate_prompts, encode_texts, special_ids
from distillery.data.text.dataset import TokenDataset
from distillery.generation.sampling import build_batch, generate_completions
from distillery.models.hf import HFCausalLMAdapter


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    dataset: TokenDataset,
    batch_size: int,
    device,
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Per-token NLL and perplexity over the labelled tokens of ``dataset``; with ``teacher``, the
    top-1 next-token agreement with it (percent)."""
    adapter = HFCausalLMAdapter()
    was_training = model.training
    model.eval()
    total_nll, total_tokens, agree = 0.0, 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = adapter.forward(model, batch).logits.float()  # (B, T-1, V)
            target, mask = adapter.rows(batch)
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            total_nll += float(DF.cross_entropy(logits, target, mask=mask, reduction="sum"))
            total_tokens += int(mask.sum())
            if teacher is not None:
                t_logits = adapter.forward(teacher, batch).logits.float()
                if vocab_size is not None:
                    t_logits = t_logits[..., :vocab_size]
                agree += int((logits.argmax(-1) == t_logits.argmax(-1))[mask].sum())
    finally:
        model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    out = {"nll": mean, "perplexity": math.exp(min(mean, 50.0))}
    if teacher is not None:
        out["agreement"] = 100.0 * agree / max(total_tokens, 1)
    return out


@torch.no_grad()
def task_accuracy(
    model: nn.Module,
    tokenizer,
    problems: Sequence,
    device,
    max_new_tokens: int,
    score: Callable[[object, list[int]], float],
    batch_size: int = 64,
    add_bos: bool = True,
) -> float:
    """Mean score (percent) of greedy completions of the problems' prompts.

    Args:
        model: a causal LM (``generate``); put in ``eval()`` and restored.
        tokenizer: encodes the prompts (``<bos>`` first with ``add_bos``, left padded).
        problems: objects with a ``.prompt`` string.
        device: where the model runs.
        max_new_tokens: tokens generated per answer at most.
        score: ``score(problem, generated_ids) -> float`` in ``[0, 1]`` (a bool counts as 0/1); the ids are
            the row generated after the prompt, padding after its ``<eos>`` included.
        batch_size: prompts per ``generate`` call.
        add_bos: start every prompt with ``<bos>`` (as training rows of prompt data do).
    """
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            enc = collate_prompts([p.prompt for p in chunk], tokenizer, add_bos=add_bos)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            rows = out[:, enc["input_ids"].shape[1] :].tolist()
            total += sum(float(score(p, ids)) for p, ids in zip(chunk, rows))
    finally:
        model.train(was_training)
    return 100.0 * total / max(len(problems), 1)


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
