"""The user's own data for the LM task: ``data.name`` text, prompt_completion or messages.

:func:`prepare_user_data` reads the tables (:func:`distillery.data.tables.load_table`), carves the
validation and test rows from the training rows where no file is given (shuffled with
``data.split_seed``), builds the tokenizer on the training rows only, and lays the rows out for the
loop (:mod:`distillery.data.text.user`; streamed text: :mod:`distillery.data.text.stream`). It
returns the same dictionary as the built-in data of :func:`distillery.tasks.lm.prepare_data`, with
the problems of prompt data scored by the configured verifier.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillery.data.tables import TableSource, load_table
from distillery.data.text.collate import special_ids
from distillery.data.text.dataset import TokenDataset
from distillery.data.text.stream import TextStream, stream_blocks
from distillery.data.text.tokenizer import train_tokenizer
from distillery.data.text.user import (
    Example,
    as_text,
    cap,
    carve,
    check_messages,
    column,
    conversation,
    documents,
    encode_examples,
    pack_documents_with_bos,
    pairs,
)
from distillery.data.text.verifiers import ExactMatchVerifier, build_verifier
from distillery.errors import ConfigError
from distillery.tasks.lm.config import LMRunConfig

SPLITS = ("validation", "test")


def prepare_user_data(cfg: LMRunConfig) -> dict[str, Any]:
    """Tokenizer, training, validation and test sets of the user's data (see the module docstring).

    The keys are those of :func:`distillery.tasks.lm.prepare_data`, plus ``digest`` (what the
    teacher cache keys on: a hash of the tokenized training rows, or of the streamed files' names,
    sizes and times), ``bos_in_rows`` (True: every row starts with ``<bos>``) and, for prompt data,
    ``score(problem, generated_ids) -> float`` and ``train_examples`` (the training rows as examples,
    by sample id).
    """
    if cfg.data.name == "text":
        return _streamed_text(cfg) if cfg.data.streaming else _text(cfg)
    return _prompts(cfg)


# ----------------------------------------------------------------------------------------------------
# Plain text
# ----------------------------------------------------------------------------------------------------


def _text(cfg: LMRunConfig) -> dict[str, Any]:
    d = cfg.data
    field = d.fields.text
    docs = documents(
        column(load_table(d.train, "data.train", [field], text=[field]), field), "data.train", field
    )
    train_rows, carved = _carve(len(docs), cfg)
    train_docs = [docs[i] for i in train_rows]
    tokenizer = d.tokenizer.build(train_docs)
    train = pack_documents_with_bos(train_docs, tokenizer, d.seq_len)
    if d.max_train_blocks is not None and len(train) > d.max_train_blocks:
        g = torch.Generator().manual_seed(0)
        train = train.subset(torch.randperm(len(train), generator=g)[: d.max_train_blocks].sort().values)
    sets = {"train": train}
    for split in SPLITS:
        source = getattr(d, split)
        if isinstance(source, TableSource):
            sets[split] = _eval_text(source, f"data.{split}", field, tokenizer, cfg)
        else:
            sets[split] = cap(pack_documents_with_bos([docs[i] for i in carved[split]], tokenizer, d.seq_len),
                              d.max_eval_blocks)  # fmt: skip
    _check_blocks(sets)
    return {**sets, "tokenizer": tokenizer, "problems": None, "digest": _digest(train), "bos_in_rows": True}


def _eval_text(source: TableSource, where: str, field: str, tokenizer: Any, cfg: LMRunConfig) -> TokenDataset:
    """A validation or test file of text, packed; a streamed one is read up to ``max_eval_blocks``."""
    d = cfg.data
    table = load_table(source, where, [field], text=[field])
    if source.streaming:
        blocks = list(stream_blocks(table, field, tokenizer, d.seq_len, where, d.max_eval_blocks))
        return TokenDataset(blocks, pad_id=special_ids(tokenizer)[0]) if blocks else []
    docs = documents(column(table, field), where, field)
    return cap(pack_documents_with_bos(docs, tokenizer, d.seq_len), d.max_eval_blocks)


def _check_blocks(sets: dict[str, Any]) -> None:
    for name, rows in sets.items():
        if len(rows) == 0:
            raise ConfigError(f"data.{name}: the text holds no block of at least 2 tokens; check the data")


def _streamed_text(cfg: LMRunConfig) -> dict[str, Any]:
    d = cfg.data
    field = d.fields.text
    table = load_table(d.train, "data.train", [field], text=[field])
    head = {split: getattr(d, split) for split in SPLITS if not isinstance(getattr(d, split), TableSource)}
    n_head = sum(head.values())
    rows = list(table.take(n_head)) if n_head else []
    at, head_docs = 0, {}
    for split, count in head.items():
        texts = [
            as_text(r.get(field), "data.train", field, at + i) for i, r in enumerate(rows[at : at + count])
        ]
        at += count
        head_docs[split] = [t for t in texts if t.strip()]
        if not head_docs[split]:
            raise ConfigError(
                f"data.{split}={count}: the first rows of data.train hold no text for it (the stream is shorter, "
                "or those rows are empty)"
            )
    train_stream = table.skip(n_head) if n_head else table
    if d.tokenizer.kind == "bpe":
        sample = [
            as_text(r.get(field), "data.train", field, i)
            for i, r in enumerate(train_stream.take(d.tokenizer_rows))
        ]
        sample = [t for t in sample if t.strip()]
        if not sample:
            raise ConfigError(
                "data.train: the stream holds no training text after the validation and test rows"
            )
        tokenizer = d.tokenizer.build(sample)
    else:
        tokenizer = d.tokenizer.build("")
    sets: dict[str, Any] = {}
    for split in SPLITS:
        if split in head:
            sets[split] = cap(
                pack_documents_with_bos(head_docs[split], tokenizer, d.seq_len), d.max_eval_blocks
            )
        else:
            sets[split] = _eval_text(getattr(d, split), f"data.{split}", field, tokenizer, cfg)
    _check_blocks(sets)
    stream = TextStream(train_stream, field, tokenizer, d.seq_len, "data.train", max_blocks=d.max_train_blocks,
                        shuffle_buffer=d.shuffle_buffer)  # fmt: skip
    if not stream.first_blocks(1):
        raise ConfigError("data.train: the stream holds no training text of at least 2 tokens after the "
                          "validation and test rows")  # fmt: skip
    return {"train": stream, **sets, "tokenizer": tokenizer, "problems": None, "bos_in_rows": True,
            "digest": _files_fingerprint(d.train, n_head)}  # fmt: skip


def _files_fingerprint(source: TableSource, skipped: int) -> str:
    """Names, sizes and modification times of a streamed source's files (reading them all to hash
    their bytes would defeat streaming); a hub id by its name and split."""
    h = hashlib.sha256(json.dumps({"skip": skipped, "split": source.split, "hub": source.hub}).encode())
    if source.path is not None:
        import glob

        path = Path(source.path)
        files = sorted(glob.glob(source.path)) if any(c in source.path for c in "*?[") else [str(path)]
        for f in files:
            items = sorted(Path(f).rglob("*")) if Path(f).is_dir() else [Path(f)]
            for item in items:
                if item.is_file():
                    st = item.stat()
                    h.update(f"{os.path.abspath(item)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Prompt data: prompt/completion pairs and chats
# ----------------------------------------------------------------------------------------------------


def _prompts(cfg: LMRunConfig) -> dict[str, Any]:
    d = cfg.data
    verifier = d.verifier or ExactMatchVerifier()
    score_text = build_verifier(verifier, "data.verifier")  # a function that does not import fails now
    ref_field = verifier.field
    if d.name == "prompt_completion":
        needed = [d.fields.prompt, d.fields.completion]
    else:
        needed = [d.fields.messages]
    if ref_field is not None and ref_field not in needed:
        needed.append(ref_field)
    tables = {"train": load_table(d.train, "data.train", needed, text=needed)}
    for split in SPLITS:
        if isinstance(getattr(d, split), TableSource):
            tables[split] = load_table(getattr(d, split), f"data.{split}", needed, text=needed)

    tokenizer = d.tokenizer.build("") if d.tokenizer.kind == "pretrained" else None
    render, bos_text = None, None
    if d.name == "messages":
        renderer = tokenizer if tokenizer is not None else train_tokenizer("", kind="byte", use_cache=False)
        if d.chat_template is not None:
            renderer.chat_template = d.chat_template
        if getattr(renderer, "chat_template", None) is None:
            raise ConfigError(
                f"data.name=messages renders chats with the tokenizer's chat template, but the tokenizer "
                f"{d.tokenizer.pretrained!r} has none; set data.chat_template: <a Jinja template string>, or use a "
                "tokenizer that has one (distillery's bpe and byte tokenizers come with a default)"
            )

        def render(messages: list[dict[str, str]], gen: bool) -> str:
            return renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

        bos_text = renderer.bos_token
    train_on = d.train_on or ("all" if cfg.method.name == "token" else "last")
    examples = {
        name: _examples(cfg, table, name, ref_field, render, bos_text, train_on)
        for name, table in tables.items()
    }
    train_rows, carved = _carve(len(examples["train"]), cfg)
    for split in SPLITS:
        if split not in examples:
            examples[split] = [examples["train"][i] for i in carved[split]]
    examples["train"] = [examples["train"][i] for i in train_rows]
    if d.max_train_blocks is not None and len(examples["train"]) > d.max_train_blocks:
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(examples["train"]), generator=g)[: d.max_train_blocks].sort().values
        examples["train"] = [examples["train"][i] for i in keep.tolist()]
    if cfg.method.name != "token":
        multi = next((e for e in examples["train"] if e.learned_turns() > 1), None)
        if multi is not None:
            raise ConfigError(
                f"data.train: row {multi.row} (0-based) learns {multi.learned_turns()} assistant turns, but "
                f"method.name={cfg.method.name} samples one response per prompt; set data.train_on=last"
            )

    if tokenizer is None:
        tokenizer = d.tokenizer.build(_tokenizer_text(examples["train"]))
        if d.name == "messages":
            tokenizer.chat_template = renderer.chat_template  # saved with the students
    elif d.chat_template is not None:
        tokenizer.chat_template = d.chat_template
    problems = {
        split: examples[split][: d.max_eval_blocks] if d.max_eval_blocks else examples[split]
        for split in SPLITS
    }
    sets = {"train": encode_examples(examples["train"], tokenizer, d.seq_len, "data.train")}
    for split in SPLITS:
        sets[split] = encode_examples(problems[split], tokenizer, d.seq_len, f"data.{split}")
    return {
        **sets,
        "tokenizer": tokenizer,
        "problems": problems,
        "train_pairs": examples["train"],
        "train_examples": examples["train"],
        "check": None,
        "score": _scorer(score_text, tokenizer),
        "digest": _digest(sets["train"]),
        "bos_in_rows": True,
        "max_answer_tokens": max(int((lab != -100).sum()) for lab in sets["train"].labels),
    }


def _examples(
    cfg: LMRunConfig, table: Any, name: str, ref_field: str | None, render, bos_text, train_on: str
) -> list[Example]:
    d, where = cfg.data, f"data.{name}"
    refs = column(table, ref_field) if ref_field is not None else None
    if d.name == "prompt_completion":
        f = d.fields
        return pairs(
            column(table, f.prompt),
            column(table, f.completion),
            refs,
            where,
            (f.prompt, f.completion, ref_field),
        )
    out = []
    for i, value in enumerate(column(table, d.fields.messages)):
        messages = check_messages(value, where, d.fields.messages, i)
        ref = None if refs is None else as_text(refs[i], where, ref_field, i)
        out.append(
            conversation(
                messages, render, train_on=train_on, bos_text=bos_text, reference=ref, where=where, row=i
            )
        )
    return out


def _tokenizer_text(examples: list[Example]) -> list[str]:
    """The training text a bpe tokenizer learns its merges from (special-token strings removed)."""
    texts = []
    for e in examples:
        text = e.prompt + e.response if e.segments is None else "".join(t for t, _ in e.segments)
        for special in ("<pad>", "<bos>", "<eos>"):
            text = text.replace(special, "\n")
        texts.append(text)
    return texts


def _scorer(
    score_text: Callable[[str, str, str], float], tokenizer: Any
) -> Callable[[Example, list[int]], float]:
    """``score(example, generated_ids)``: the verifier on the response decoded up to its first
    ``<eos>``, without special tokens."""
    eos_id = tokenizer.eos_token_id

    def score(example: Example, ids: list[int]) -> float:
        ids = list(ids)
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        response = tokenizer.decode(ids, skip_special_tokens=True)
        return score_text(example.prompt, response, example.reference)

    return score


# ----------------------------------------------------------------------------------------------------
# Shared
# ----------------------------------------------------------------------------------------------------


def _carve(n: int, cfg: LMRunConfig) -> tuple[list[int], dict[str, list[int]]]:
    """Training rows and the rows carved for the splits not given as files (null: 5%)."""
    d = cfg.data
    amounts = {}
    for split in SPLITS:
        value = getattr(d, split)
        amounts[split] = None if isinstance(value, TableSource) else (0.05 if value is None else value)
    train, val, test = carve(n, amounts["validation"], amounts["test"], d.split_seed, "data")
    return train, {"validation": val, "test": test}


def _digest(dataset: TokenDataset) -> str:
    """SHA-256 of a dataset's token ids and labels (what training on it depends on)."""
    h = hashlib.sha256()
    labels = dataset.labels or [None] * len(dataset)
    for ids, lab in zip(dataset.input_ids, labels):
        h.update(ids.numpy().tobytes())
        h.update(b"|" if lab is None else lab.numpy().tobytes())
    return h.hexdigest()


__all__ = ["prepare_user_data"]
