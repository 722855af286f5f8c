"""A tiny deterministic teacher over token rows, for the teacher-output cache tests.

``ToyLM`` maps each input id to a fixed row of logits (an embedding table), so its outputs do not
depend on how rows are batched; ``toy_source`` wraps it over a :class:`TokenDataset` of rows of
varied length (some with masked prompts) as the LM task would.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from distillery.cache import OutputSource, weights_sha256
from distillery.data.text import TokenDataset
from distillery.models.adapters import ModelOutput

VOCAB = 37


class ToyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, seed: int = 0, delay: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3.0, requires_grad=False)
        self.delay = delay

    def forward(self, batch):
        if self.delay:
            time.sleep(self.delay)  # the fault tests kill the writer at random moments
        return ModelOutput(logits=self.table[batch["input_ids"][:, :-1]].float(),
                           features={"pooled": self.table[batch["input_ids"][:, 0]].float()})  # fmt: skip


def toy_rows(n: int = 23, seed: int = 0, vocab: int = VOCAB) -> TokenDataset:
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(n):
        length = int(torch.randint(3, 9, (), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g)
        lab = ids.clone()
        lab[: int(i % 3)] = -100  # a masked prompt on some rows
        rows.append(ids)
        labels.append(lab)
    return TokenDataset(rows, labels, pad_id=0, index=torch.arange(n) * 2 + 5)  # ids that are not positions


def toy_source(n: int = 23, *, teacher_seed: int = 0, data_seed: int = 0, delay: float = 0.0,
               tokenizer: str = "tok-a") -> OutputSource:  # fmt: skip
    model = ToyLM(seed=teacher_seed, delay=delay)
    data = toy_rows(n, data_seed)
    return OutputSource(
        dataset=data,
        forward=model,
        keys=("input_ids", "attention_mask"),
        vocab_size=VOCAB,
        identity={"task": "lm", "teacher": weights_sha256(model), "tokenizer": tokenizer},
        positions=int(data.lengths().max()) - 1,
        valid=lambda batch: batch["labels"][:, 1:] != -100,
    )
