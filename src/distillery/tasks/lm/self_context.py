"""``teacher.source: self`` in the LM task: contexts per training row, the starting model's rows, length checks.

The teacher is the student's own weights (:class:`~distillery.teachers.self_context.SelfContextTeacher`)
reading ``teacher.context`` rendered for each example (:mod:`distillery.data.text.context`). This
module turns the run's training rows into that table of contexts (sample id -> the template's ids
before and after the prompt), checks that every teacher row fits the model, and builds the rows the
shared starting model is trained on first when ``teacher.train`` is set: the run's training rows (the
fact task: questions about other people) with a ``teacher.train_context`` share of them shown in the
teacher's format, so that the model learns to read the context it will later be given as a teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from distillery.data.text import TokenDataset
from distillery.data.text.collate import encode_texts
from distillery.data.text.context import REWARD_TEXT, split_template
from distillery.data.text.jsonl import PromptResponse
from distillery.errors import ConfigError
from distillery.tasks.lm.config import LMRunConfig
from distillery.teachers.self_context import Context, response_starts, teacher_prompt


def default_fields(pair: Any) -> dict[str, str]:
    """The placeholders every prompt dataset fills: the reference response."""
    return {"response": pair.response}


def build_contexts(
    template: str,
    pairs: Sequence[Any],
    tokenizer: Any,
    fields: Callable[[Any], dict[str, str]] = default_fields,
) -> list[Context]:
    """Per example (in the order of ``pairs``, the rows' sample ids): the template's ids before and after
    ``{prompt}`` (after: None when the template has no ``{prompt}``).

    Example:
        >>> from types import SimpleNamespace
        >>> from distillery.data.text.tokenizer import train_tokenizer
        >>> tok = train_tokenizer("", kind="byte", use_cache=False)
        >>> [c] = build_contexts("A:{response}|{prompt}", [SimpleNamespace(response="7")], tok)
        >>> tok.decode(c[0]), c[1]
        ('A:7|', [])
    """
    parts = [split_template(template, fields(p)) for p in pairs]
    before = encode_texts(tokenizer, [b for b, _ in parts])
    after = encode_texts(tokenizer, [a or "" for _, a in parts])
    return [(b, None if a is None else ids) for b, ids, (_, a) in zip(before, after, parts)]


def _rows(dataset: TokenDataset) -> list[tuple[list[int], list[int], int]]:
    """``(ids, labels, response start)`` of every row."""
    out = []
    for ids, labels in zip(dataset.input_ids, dataset.labels):
        start = int(response_starts(labels.unsqueeze(0))[0])
        out.append((ids.tolist(), labels.tolist(), start))
    return out


def check_lengths(
    cfg: LMRunConfig, dataset: TokenDataset, contexts: Sequence[Context], max_length: int, bos_id: int
) -> None:
    """Refuse (unless ``teacher.truncate_context``) a training row whose teacher input exceeds ``max_length``.

    A fixed row's teacher input is its teacher prompt plus its response; with sampled responses
    (``method.name: on_policy``) the response may be up to ``method.max_new_tokens`` long. With
    ``truncate_context`` only a row that does not fit even without its context is refused.
    """
    t = cfg.teacher
    sampled = cfg.method.max_new_tokens if cfg.method.name == "on_policy" else 0
    worst = None
    for i, (ids, _, start) in enumerate(_rows(dataset)):
        response = max(len(ids) - start, sampled)
        before, after = contexts[int(dataset.index[i])]
        bare = teacher_prompt(ids[:start], ([], after), bos_id, None, False)
        full = len(bare) + len(before) + response
        if full > max_length and (worst is None or full > worst[1]):
            worst = (i, full, len(bare) + response)
    if worst is None:
        return
    i, full, bare = worst
    if t.truncate_context and bare <= max_length:
        return
    fix = (
        "the prompt and response alone exceed it: shorten data.seq_len or method.max_new_tokens"
        if bare > max_length
        else "shorten teacher.context, raise student.max_positions, or set teacher.truncate_context: true (drops "
        "the context's first tokens)"
    )
    raise ConfigError(
        f"teacher.context: with its context, the teacher's input for training row {i} is {full} tokens, "
        f"{full - max_length} more than the model's maximum length {max_length}; {fix}"
    )


def base_rows(
    dataset: TokenDataset,
    contexts: Sequence[Context],
    share: float,
    *,
    bos_id: int,
    pad_id: int,
    max_length: int,
    truncate: bool,
    seed: int,
) -> TokenDataset:
    """The starting model's training rows: ``dataset``'s rows, a ``share`` of them (drawn with ``seed``)
    laid out as the teacher reads them (context, prompt, the same response and labels).

    Example:
        >>> ds = TokenDataset([[1, 5, 7, 2]], [[-100, -100, 7, 2]], pad_id=0)
        >>> out = base_rows(ds, [([9], [])], 1.0, bos_id=1, pad_id=0, max_length=16, truncate=False, seed=0)
        >>> out.input_ids[0].tolist(), out.labels[0].tolist()
        ([1, 9, 5, 7, 2], [-100, -100, -100, 7, 2])
    """
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(len(dataset), generator=g) < share
    ids_out, labels_out = [], []
    for i, (ids, labels, start) in enumerate(_rows(dataset)):
        if bool(chosen[i]):
            room = max_length - (len(ids) - start)
            prompt = teacher_prompt(ids[:start], contexts[int(dataset.index[i])], bos_id, room, truncate)
            ids, labels = prompt + ids[start:], [-100] * len(prompt) + labels[start:]
        ids_out.append(ids)
        labels_out.append(labels)
    return TokenDataset(ids_out, labels_out, pad_id=pad_id)


def self_prompts(template: str, data: dict[str, Any]) -> list[PromptResponse]:
    """The training pairs with each prompt replaced by the teacher's (the template around the prompt
    text), for generating the self-teacher's responses (sequence-level KD from itself, SDFT)."""
    fields = data.get("contexts", default_fields)
    out = []
    for pair in data["train_pairs"]:
        before, after = split_template(template, fields(pair))
        out.append(PromptResponse(before if after is None else before + pair.prompt + after, pair.response))
    return out


def keep_verified(
    data: dict[str, Any], generated: Sequence[Any], tokenizer: Any
) -> tuple[list[PromptResponse], float]:
    """SDFT's filter ("Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning"): each
    training pair with the model's own response when the task's verifier accepts it, else with the
    reference response; and the share kept. Without a verifier every rewrite is kept."""
    check, score = data.get("check"), data.get("score")
    out, kept = [], 0
    for pair, gen in zip(data["train_pairs"], generated):
        if check is not None:
            ok = bool(check(pair.prompt, gen.response))
        elif score is not None:
            ok = score(pair, tokenizer(gen.response, add_special_tokens=False)["input_ids"]) > 0
        else:
            ok = True
        kept += ok
        out.append(PromptResponse(pair.prompt, gen.response if ok else pair.response))
    return out, kept / max(len(out), 1)


def revision_fields(
    pairs: Sequence[Any], fields: Callable[[Any], dict[str, str]], check: Callable[[str, str], bool] | None
) -> Callable[[Any], dict[str, str]]:
    """``{attempt}`` and ``{reward}`` for the fixed rows of a self-revision run (the starting model's rows
    and the length check): every other row shows its own reference answer as the attempt, judged
    correct; the rest show the next row's answer, judged by the task's ``check`` (wrong unless it
    happens to be right), so that the starting model learns to copy a correct attempt and to answer
    anew after a wrong one."""
    where = {id(p): i for i, p in enumerate(pairs)}

    def with_attempt(pair: Any) -> dict[str, str]:
        i = where[id(pair)]
        attempt = pair.response if i % 2 == 0 else pairs[(i + 1) % len(pairs)].response
        ok = attempt == pair.response or (check is not None and bool(check(pair.prompt, attempt)))
        return {**fields(pair), "attempt": attempt, "reward": REWARD_TEXT[ok]}

    return with_attempt
