"""The user's own language-model data: plain text, prompt/completion pairs and chat conversations.

Tables are read by :func:`distillery.data.tables.load_table` (JSONL, CSV, Parquet, .txt, a
``save_to_disk`` folder, a hub id); this module turns their rows into training rows.

Plain text (``data.name: text``): every row's text field (a .txt file: every non-empty line) is a
document; documents are laid out as ``[bos] document [eos]`` one after the other and the stream is cut
into blocks of ``seq_len`` tokens (the last, shorter block is kept); every token but a block's first
is a target.

Prompt/completion pairs (``data.name: prompt_completion``): ``[bos] prompt completion [eos]``, the
prompt masked (the layout of :mod:`distillery.data.text.collate`).

Chats (``data.name: messages``): a list of ``{role, content}`` messages rendered with the tokenizer's
chat template. The learned turns are the assistant messages (all of them, or only the last); the
rest -- system and user messages, the template's role markers, the generation prompt before each
learned turn -- is context, masked out of the loss. The row is tokenized segment by segment::

    render(messages[:i], add_generation_prompt=True)   context  (everything before assistant turn i)
    render(messages[:i+1])[len(context):]              learned  (turn i as the template writes it)

so the learned tokens are exactly those a model generates after the generation prompt; the template
must render conversations incrementally (each rendering a prefix of the next), as chat templates do.
A ``<bos>`` the template writes itself is dropped (the row starts with one ``<bos>`` either way), and no
``<eos>`` is appended: the template ends the assistant turn (distillery's default template ends it with
``<eos>``, where generation stops).

Each example also has a ``prompt`` (the text generation continues: the context before the last
learned turn), a ``response`` (the completion, or the last assistant message) and a ``reference``
(what a verifier compares a generated response to).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distillery.data.base import UNLABELLED
from distillery.data.text.collate import encode_pair, encode_texts, special_ids
from distillery.data.text.dataset import TokenDataset
from distillery.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One prompt example of the user's data.

    Attributes:
        prompt: the text generation continues (a chat: rendered up to the last learned turn, with the
            generation prompt).
        response: what the model learns to answer (the completion; a chat: the last assistant message).
        reference: what a verifier compares a generated response to.
        segments: a chat's text pieces ``(text, learned)`` in order; None: ``prompt`` then
            ``response`` and ``<eos>``.
        row: the example's row in its table (0-based), for messages.
    """

    prompt: str
    response: str
    reference: str
    segments: tuple[tuple[str, bool], ...] | None = None
    row: int = 0

    def learned_turns(self) -> int:
        """How many separate learned pieces the training row has."""
        return 1 if self.segments is None else sum(learned for _, learned in self.segments)


# ----------------------------------------------------------------------------------------------------
# Rows of a table
# ----------------------------------------------------------------------------------------------------


def as_text(value: Any, where: str, field: str, row: int) -> str:
    """A field's value as a string: strings as they are, integers and floats written out (CSV readers
    turn numeric columns into numbers); anything else is a ConfigError naming the row."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    what = "empty (null)" if value is None else f"a {type(value).__name__}, not text"
    raise ConfigError(f"{where}: row {row} (0-based): the field {field!r} is {what}")


def column(table: Any, name: str) -> list[Any]:
    """The values of one column of a (non-streaming) ``datasets.Dataset``, as a list."""
    return list(table[name])


def documents(values: Sequence[Any], where: str, field: str) -> list[str]:
    """The non-empty texts of a text column (blank lines of a .txt file are skipped).

    Raises:
        ConfigError: a value is not text, or no value holds any text.
    """
    out = [as_text(v, where, field, i) for i, v in enumerate(values)]
    out = [t for t in out if t.strip()]
    if not out:
        raise ConfigError(f"{where}: the field {field!r} holds no text (every row is empty)")
    return out


def pairs(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    references: Sequence[Any] | None,
    where: str,
    fields: tuple,
) -> list[Example]:
    """Prompt/completion examples; ``references`` default to the completions."""
    p_field, c_field, r_field = fields
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt, completion = as_text(p, where, p_field, i), as_text(c, where, c_field, i)
        if not completion:
            raise ConfigError(
                f"{where}: row {i} (0-based): the field {c_field!r} is empty; there is nothing to learn"
            )
        ref = completion if references is None else as_text(references[i], where, r_field, i)
        out.append(Example(prompt, completion, ref, row=i))
    return out


# ----------------------------------------------------------------------------------------------------
# Chats
# ----------------------------------------------------------------------------------------------------

Render = Callable[[list[dict[str, str]], bool], str]


def check_messages(value: Any, where: str, field: str, row: int) -> list[dict[str, str]]:
    """A row's messages as ``[{"role": str, "content": str}, ...]``; anything else is a ConfigError."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"{where}: row {row} (0-based): the field {field!r} must be a non-empty list of "
            f"{{role, content}} messages, got {type(value).__name__ if value is not None else 'null'}"
        )
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: row {row} (0-based): message {j} of {field!r} must have a string 'role' and a string "
                f"'content' (got {m!r:.80})"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def conversation(
    messages: list[dict[str, str]],
    render: Render,
    *,
    train_on: str,
    bos_text: str | None,
    reference: str | None,
    where: str,
    row: int,
) -> Example:
    """A chat as an :class:`Example` whose segments mask everything but the learned assistant turns.

    Args:
        messages: ``[{role, content}, ...]`` with at least one assistant message.
        render: ``render(messages, add_generation_prompt) -> text`` (the tokenizer's chat template).
        train_on: ``"all"`` assistant turns or only the ``"last"``.
        bos_text: the tokenizer's ``<bos>`` string, dropped where the template writes it first.
        reference: the verifier's reference (None: the last assistant message).
        where, row: for messages.

    Example:
        >>> def render(msgs, gen):  # the shape of distillery's default template
        ...     text = "".join(m["role"] + ": " + m["content"] + ("<eos>" if m["role"] == "assistant" else "\\n")
        ...                    for m in msgs)
        ...     return text + ("assistant: " if gen else "")
        >>> msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        >>> conversation(msgs, render, train_on="all", bos_text="<bos>", reference=None, where="data", row=0).segments
        (('user: hi\\nassistant: ', False), ('yo<eos>', True))
    """
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        roles = sorted({m["role"] for m in messages})
        raise ConfigError(
            f"{where}: row {row} (0-based) has no assistant message (roles: {', '.join(roles)}); every "
            "conversation needs at least one assistant turn to learn"
        )
    learned = assistant if train_on == "all" else assistant[-1:]

    def text(msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            out = render(msgs, gen)
        except Exception as exc:  # jinja raises on conversations a template refuses
            raise ConfigError(
                f"{where}: row {row} (0-based): the chat template cannot render this conversation "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if bos_text and out.startswith(bos_text):
            out = out[len(bos_text) :]
        return out

    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    for i in learned:
        context = text(messages[:i], True)
        full = text(messages[: i + 1], False)
        if not context.startswith(done) or not full.startswith(context):
            raise ConfigError(
                f"{where}: row {row} (0-based): the chat template does not render the conversation incrementally "
                f"(the text up to assistant message {i} is not a prefix of the text with it), so the prompt "
                "tokens cannot be told from the answer; use a template whose rendering of the first messages is "
                "a prefix of the rendering of all of them (data.chat_template)"
            )
        if len(full) == len(context):
            raise ConfigError(f"{where}: row {row} (0-based): assistant message {i} renders as no text")
        if len(context) > len(done):
            segments.append((context[len(done) :], False))
        segments.append((full[len(context) :], True))
        done, prompt = full, context
    last = messages[learned[-1]]["content"]
    return Example(prompt, last, last if reference is None else reference, tuple(segments), row)


# ----------------------------------------------------------------------------------------------------
# Token rows
# ----------------------------------------------------------------------------------------------------


def encode_segments(
    pieces: Sequence[tuple[Sequence[int], bool]], bos_id: int, max_length: int | None
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``[bos]`` and token pieces, labels -100 on pieces not learned.

    Cut to ``max_length`` tokens from the end; a row whose first learned token does not fit is an error.

    Example:
        >>> encode_segments([([5, 6], False), ([7, 2], True), ([8], False), ([9, 2], True)], 1, None)
        ([1, 5, 6, 7, 2, 8, 9, 2], [-100, -100, -100, 7, 2, -100, 9, 2])
    """
    ids, labels = [bos_id], [UNLABELLED]
    for tokens, learned in pieces:
        ids.extend(tokens)
        labels.extend(tokens if learned else [UNLABELLED] * len(tokens))
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == UNLABELLED for lab in labels[1:]):
        raise ValueError(f"no learned token fits in max_length={max_length}")
    return ids, labels


def encode_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int | None, where: str
) -> TokenDataset:
    """Training rows of prompt examples (see the module docstring for the layouts).

    Raises:
        ConfigError: examples whose prompt leaves no room for one answer token in ``max_length``
            (the message counts them and names the first).
    """
    pad_id, bos_id, eos_id = special_ids(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    too_long: list[tuple[int, int]] = []  # (row, prompt tokens)
    plain = [e for e in examples if e.segments is None]
    chats = [e for e in examples if e.segments is not None]
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    if plain:
        prompts = encode_texts(tokenizer, [e.prompt for e in plain])
        responses = encode_texts(tokenizer, [e.response for e in plain])
        for e, p, r in zip(plain, prompts, responses):
            try:
                encoded[id(e)] = encode_pair(p, r, bos_id=bos_id, eos_id=eos_id, max_length=max_length)
            except ValueError:
                too_long.append((e.row, 1 + len(p)))
    if chats:
        flat = encode_texts(tokenizer, [text for e in chats for text, _ in e.segments])
        at = 0
        for e in chats:
            pieces = [(flat[at + j], learned) for j, (_, learned) in enumerate(e.segments)]
            at += len(e.segments)
            try:
                encoded[id(e)] = encode_segments(pieces, bos_id, max_length)
            except ValueError:
                first = next(j for j, (_, learned) in enumerate(pieces) if learned)
                too_long.append((e.row, 1 + sum(len(t) for t, _ in pieces[:first])))
    if too_long:
        row, n = too_long[0]
        raise ConfigError(
            f"{where}: {len(too_long)} of {len(examples)} examples have a prompt that leaves no room for the answer "
            f"in data.seq_len={max_length} tokens (the first: row {row} (0-based), {n} tokens with <bos>); raise "
            "data.seq_len or shorten those prompts"
        )
    rows = [encoded[id(e)] for e in examples]
    return TokenDataset([r[0] for r in rows], [r[1] for r in rows], pad_id=pad_id)


def pack_documents_with_bos(documents: Sequence[str], tokenizer: Any, seq_len: int) -> TokenDataset:
    """Plain-text blocks: ``[bos] doc [eos]`` for every document, concatenated and cut every
    ``seq_len`` tokens; a last, shorter block of at least 2 tokens is kept.

    Example:
        >>> from distillery.data.text.tokenizer import train_tokenizer
        >>> tok = train_tokenizer("", kind="byte", use_cache=False)
        >>> ds = pack_documents_with_bos(["ab", "c"], tok, seq_len=4)  # 1 100 101 2 | 1 102 2
        >>> [row.tolist() for row in ds.input_ids]
        [[1, 100, 101, 2], [1, 102, 2]]
    """
    pad_id, bos_id, eos_id = special_ids(tokenizer)
    return TokenDataset(
        pack_blocks(encode_texts(tokenizer, list(documents)), seq_len, bos_id, eos_id), pad_id=pad_id
    )


def pack_blocks(
    documents: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int
) -> list[list[int]]:
    """``[bos] doc [eos]`` for every document, concatenated and cut every ``seq_len`` tokens; a last,
    shorter block is kept when it has at least 2 tokens (a context and a target).

    Example:
        >>> pack_blocks([[5, 6, 7], [8]], seq_len=4, bos_id=1, eos_id=2)  # stream 1 5 6 7 2 1 8 2
        [[1, 5, 6, 7], [2, 1, 8, 2]]
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a block needs at least 2 tokens (context and a target)")
    stream = [t for doc in documents for t in (bos_id, *doc, eos_id)]
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    return blocks


# ----------------------------------------------------------------------------------------------------
# Validation and test rows carved from the training rows
# ----------------------------------------------------------------------------------------------------


def carve_count(amount: int | float, n: int) -> int:
    """Rows a split takes of ``n``: a count, or a fraction (< 1) of ``n``, at least 1.

    Example:
        >>> carve_count(0.1, 95), carve_count(0.001, 95), carve_count(7, 95)
        (10, 1, 7)
    """
    if isinstance(amount, float):
        return max(1, round(amount * n))
    return int(amount)


def carve(
    n: int, validation: int | float | None, test: int | float | None, seed: int, where: str = "data"
) -> tuple[list[int], list[int], list[int]]:
    """``(train, validation, test)`` row positions of ``n`` rows: the rows are shuffled with ``seed``,
    the test rows are the first, the validation rows the next and the rest are trained on (in their
    order). A split given as None (it comes from its own file) takes no rows.

    Raises:
        ConfigError: nothing is left to train on.

    Example:
        >>> train, val, test = carve(10, 2, 0.3, seed=0)
        >>> len(train), len(val), len(test), sorted(train + val + test) == list(range(10))
        (5, 2, 3, True)
    """
    n_test = 0 if test is None else carve_count(test, n)
    n_val = 0 if validation is None else carve_count(validation, n)
    if n_test + n_val >= n:
        raise ConfigError(
            f"{where}.validation and {where}.test take {n_val} + {n_test} of the {n} training rows, leaving none to "
            f"train on; give smaller counts or fractions, or validation/test files"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_rows, val_rows = order[:n_test], order[n_test : n_test + n_val]
    return sorted(order[n_test + n_val :]), sorted(val_rows), sorted(test_rows)


def cap(dataset: TokenDataset, limit: int | None) -> TokenDataset:
    """The first ``limit`` rows of ``dataset`` (all of them for None)."""
    if limit is not None and len(dataset) > limit:
        return dataset.subset(torch.arange(limit))
    return dataset


__all__ = [
    "Example",
    "as_text",
    "cap",
    "carve",
    "carve_count",
    "check_messages",
    "column",
    "conversation",
    "documents",
    "encode_examples",
    "encode_segments",
    "pack_blocks",
    "pack_documents_with_bos",
    "pairs",
]
