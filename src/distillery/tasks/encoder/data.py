"""Sentences for encoder distillation and the held-out sets an encoder is judged on.

WordNet: a fixed set of synsets that have a usage example is held out (``split_seed``): their
definitions and examples are never trained on. From them come the retrieval task (definition ->
the synset's first example, among every held-out example), the linear probe (a definition's
lexicographer category: fitted on ``probe_train`` definitions, scored on ``probe_test`` others) and
the fidelity pairs (random pairs of held-out sentences). Every other gloss and example is the
training pool, from which each seed draws ``train_sentences`` and carves its validation pairs.
Austen: the corpus's train split gives the pool, its test split the fidelity pairs; there is no
retrieval or probe set.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distillery.data.tables import load_table
from distillery.data.text import load_synsets, split_austen
from distillery.data.text.user import column, documents
from distillery.errors import ConfigError
from distillery.tasks.encoder.config import EncoderDataConfig

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS = 4, 40


@dataclass
class HeldOut:
    """The test sets of a run (the same for every seed)."""

    pairs: tuple[list[str], list[str]]  # fidelity: sentence a_i with sentence b_i
    queries: list[str] = field(default_factory=list)  # retrieval: definitions
    documents: list[str] = field(default_factory=list)  # retrieval: their examples, same order
    probe_train: tuple[list[str], list[int]] = ([], [])
    probe_test: tuple[list[str], list[int]] = ([], [])
    note: str = ""  # what could not be measured, and why


def _words_ok(text: str) -> bool:
    return MIN_WORDS <= len(text.split()) <= MAX_WORDS


def _pairs(sentences: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    if len(sentences) < 2:
        raise ConfigError("data: fewer than 2 sentences for the fidelity pairs; use more data")
    a, b = [], []
    for _ in range(n):
        i, j = rng.sample(range(len(sentences)), 2)
        a.append(sentences[i])
        b.append(sentences[j])
    return a, b


def austen_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ., ! or ?, whitespace squeezed, 4 to 40 words."""
    out = []
    for part in _SENTENCE_END.split(text):
        sentence = " ".join(part.split())
        if _words_ok(sentence):
            out.append(sentence)
    return out


def build_sets(cfg: EncoderDataConfig) -> tuple[list[str], HeldOut]:
    """``(training pool, held-out sets)`` of ``cfg`` (deterministic in ``split_seed``)."""
    rng = random.Random(cfg.split_seed)
    if cfg.name == "files":
        field = cfg.text_field
        table = load_table(cfg.train, "data.train", [field], text=[field])
        sentences = list(
            dict.fromkeys(t.strip() for t in documents(column(table, field), "data.train", field))
        )
        if len(sentences) < cfg.held_out + 8:
            raise ConfigError(
                f"data.train: {len(sentences)} distinct sentences, but data.held_out={cfg.held_out} are held out and "
                "training needs at least 8 more; give more sentences or lower data.held_out"
            )
        order = list(range(len(sentences)))
        rng.shuffle(order)
        held = [sentences[i] for i in order[: cfg.held_out]]
        pool = [sentences[i] for i in order[cfg.held_out :]]
        note = "retrieval and the linear probe need WordNet (data.name=wordnet): not measured on your files"
        return pool, HeldOut(pairs=_pairs(held, cfg.fidelity_pairs, rng), note=note)
    if cfg.name == "austen":
        splits = split_austen()
        pool = list(dict.fromkeys(s for doc in splits.train for s in austen_sentences(doc)))
        held = list(dict.fromkeys(s for doc in splits.test for s in austen_sentences(doc)))
        note = "retrieval and the linear probe need WordNet (data.name=wordnet): not measured on austen"
        return pool, HeldOut(pairs=_pairs(held, cfg.fidelity_pairs, rng), note=note)
    synsets = load_synsets(cfg.root)
    candidates = [s for s in synsets if s.examples and _words_ok(s.gloss) and _words_ok(s.examples[0])]
    wanted = cfg.retrieval + cfg.probe_train + cfg.probe_test
    if wanted > len(candidates) // 2:
        raise ConfigError(
            f"data: retrieval + probe_train + probe_test = {wanted} held-out synsets, but only {len(candidates)} "
            "synsets have a usable definition and example; hold out at most half of them"
        )
    order = list(range(len(candidates)))
    rng.shuffle(order)
    chosen = [candidates[i] for i in order[:wanted]]
    held_keys = {(s.pos, s.offset) for s in chosen}
    retrieval = chosen[: cfg.retrieval]
    probe_train = chosen[cfg.retrieval : cfg.retrieval + cfg.probe_train]
    probe_test = chosen[cfg.retrieval + cfg.probe_train :]
    held_text = {s.gloss for s in chosen} | {e for s in chosen for e in s.examples}
    held_sentences = sorted(t for t in held_text if _words_ok(t))
    pool = []
    for s in synsets:
        if (s.pos, s.offset) in held_keys:
            continue
        for text in (s.gloss, *s.examples):
            if _words_ok(text) and text not in held_text:
                pool.append(text)
    pool = list(dict.fromkeys(pool))
    return pool, HeldOut(
        pairs=_pairs(held_sentences, cfg.fidelity_pairs, rng),
        queries=[s.gloss for s in retrieval],
        documents=[s.examples[0] for s in retrieval],
        probe_train=([s.gloss for s in probe_train], [s.lex_filenum for s in probe_train]),
        probe_test=([s.gloss for s in probe_test], [s.lex_filenum for s in probe_test]),
    )


class SentenceSet:
    """Tokenised sentences for the training loop: ``get_batch`` gives ``input_ids``, ``attention_mask``
    (cut to the longest sentence of the batch) and ``index``."""

    def __init__(self, sentences: list[str], tokenizer: Any, max_length: int) -> None:
        self.sentences = list(sentences)
        enc = tokenizer(
            self.sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.input_ids: Tensor = enc["input_ids"]
        self.attention_mask: Tensor = enc["attention_mask"]
        self.index = torch.arange(len(self.sentences))

    def __len__(self) -> int:
        return len(self.sentences)

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        mask = self.attention_mask[indices]
        width = max(int(mask.sum(1).max()), 1) if len(indices) else 1
        return {
            "input_ids": self.input_ids[indices, :width],
            "attention_mask": mask[:, :width],
            "index": self.index[indices],
        }


class FullWidth:
    """A :class:`SentenceSet` whose batches keep every row at ``max_length`` tokens (not cut to the batch's
    longest sentence): a teacher-output cache stores each sentence's signals at one width, whatever the
    batch it was computed in."""

    def __init__(self, sentences: SentenceSet) -> None:
        self.sentences = sentences
        self.index = sentences.index

    def __len__(self) -> int:
        return len(self.sentences)

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        s = self.sentences
        return {
            "input_ids": s.input_ids[indices],
            "attention_mask": s.attention_mask[indices],
            "index": s.index[indices],
        }


@dataclass
class EncoderSeedData:
    """One seed's data: its training sentences and validation pairs, and the shared held-out sets."""

    seed: int
    train: SentenceSet
    validation: tuple[list[str], list[str]]
    held_out: HeldOut
    cache: dict[str, Any] = field(default_factory=dict)  # teacher embeddings of the evaluation sets


def seed_data(
    seed: int, pool: list[str], held: HeldOut, cfg: EncoderDataConfig, tokenizer: Any
) -> EncoderSeedData:
    """The seed's training sentences (``train_sentences`` drawn from the pool) and validation pairs
    (carved from the pool first, so they are never trained on)."""
    rng = random.Random(1_000_003 * (seed + 1) + cfg.split_seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    n_val = min(2 * cfg.validation_pairs, len(pool) // 5)
    val_sentences = [pool[i] for i in order[:n_val]]
    rest = order[n_val:]
    take = rest if cfg.train_sentences is None else rest[: cfg.train_sentences]
    if not take:
        raise ConfigError("data: no training sentences left after the validation pairs; use more data")
    half = len(val_sentences) // 2
    validation = (val_sentences[:half], val_sentences[half : 2 * half])
    return EncoderSeedData(
        seed, SentenceSet([pool[i] for i in take], tokenizer, cfg.max_length), validation, held
    )


__all__ = ["EncoderSeedData", "HeldOut", "SentenceSet", "austen_sentences", "build_sets", "seed_data"]
