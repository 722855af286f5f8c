"""Metrics of sentence encoders: embeddings, fidelity to a teacher, retrieval, a linear probe, speed.

* :func:`encode`: sentences to embeddings ``[N, H]`` (float32, no gradients, eval mode).
* :func:`fidelity`: the Spearman correlation of student and teacher cosine similarities over sentence
  pairs -- how well the student keeps the teacher's ranking of pairs (the usual STS-style score, with
  the teacher's similarities standing in for human judgements).
* :func:`retrieval`: mean reciprocal rank and recall@k of the right document among all documents.
* :func:`linear_probe` (from :mod:`distillery.eval.probes`): accuracy of a logistic regression on
  standardised embeddings.
* :func:`encode_speed`: sentences per second of the model's forward pass.

The metric functions are pure: embeddings and labels in, numbers out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.eval.probes import linear_probe
from distillery.models.encoder import pool


def _batches(tokenizer: Any, sentences: Sequence[str], batch_size: int, max_length: int) -> list[dict]:
    """Tokenised batches (right padding, truncation at ``max_length``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [
        dict(
            tokenizer(
                list(sentences[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), batch_size)
    ]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _forward(model: nn.Module, batch: dict, device: torch.device, pooling: str, normalize: bool) -> Tensor:
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state  # (B, L, H)
    return pool(hidden.float(), batch.get("attention_mask"), pooling, normalize)  # (B, H)


def encode(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    pooling: str = "mean",
    normalize: bool = False,
) -> Tensor:
    """Sentence embeddings of ``sentences``, in order.

    Runs under ``torch.no_grad()`` with the model in eval mode (its previous mode is restored), on the
    model's device; the token states are pooled in float32 (:func:`~distillery.models.encoder.pool`).

    Args:
        model: an ``AutoModel`` encoder (returns ``last_hidden_state``).
        tokenizer: its tokenizer (a Hugging Face tokenizer: called on a list of strings).
        sentences: ``N`` texts.
        batch_size: sentences per forward pass.
        max_length: tokens per sentence (longer ones are truncated).
        pooling: ``"mean"`` or ``"cls"``.
        normalize: L2-normalise the embeddings.

    Returns:
        ``[N, H]`` float32 on the CPU (``[0, H]`` for no sentences: ``H`` from the model's config).
    """
    sentences = list(sentences)
    if not sentences:
        return torch.zeros(0, int(model.config.hidden_size))
    was_training = model.training
    model.eval()
    try:
        device = _device(model)
        out = [
            _forward(model, b, device, pooling, normalize).cpu()
            for b in _batches(tokenizer, sentences, batch_size, max_length)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)  # (N, H)


def _rows_cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)  # (N,)


def fidelity(
    student_emb_a: Tensor, student_emb_b: Tensor, teacher_emb_a: Tensor, teacher_emb_b: Tensor
) -> float:
    """Spearman correlation between the student's and the teacher's cosine similarities of ``N`` pairs.

    Pair ``i`` is (sentence ``a_i``, sentence ``b_i``); its similarity is ``cos(emb_a[i], emb_b[i])``
    under each model. 1: the student orders the pairs exactly as the teacher does. The embeddings of
    the two models may differ in width. NaN when either model gives all pairs the same similarity.

    Args:
        student_emb_a: ``[N, H_s]``, the student's embeddings of the first sentences.
        student_emb_b: ``[N, H_s]``, of the second sentences.
        teacher_emb_a: ``[N, H_t]``, the teacher's embeddings of the first sentences.
        teacher_emb_b: ``[N, H_t]``, of the second sentences.

    Example:
        >>> a, b = torch.randn(20, 8), torch.randn(20, 8)
        >>> fidelity(a, b, a * 3.0, b)  # scaling changes no cosine
        1.0
    """
    from scipy.stats import spearmanr

    n = {len(student_emb_a), len(student_emb_b), len(teacher_emb_a), len(teacher_emb_b)}
    if len(n) != 1:
        raise ValueError(
            "fidelity needs the same number of pairs from every input; got "
            f"{[len(student_emb_a), len(student_emb_b), len(teacher_emb_a), len(teacher_emb_b)]} rows"
        )
    if n == {0} or n == {1}:
        raise ValueError("fidelity needs at least two sentence pairs")
    student = _rows_cosine(student_emb_a, student_emb_b).numpy()
    teacher = _rows_cosine(teacher_emb_a, teacher_emb_b).numpy()
    return float(spearmanr(student, teacher).statistic)


def retrieval(query_emb: Tensor, doc_emb: Tensor, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Mean reciprocal rank and recall@k of retrieving document ``i`` for query ``i`` by cosine similarity.

    Every query ranks all documents; the rank of the right one is 1 + the number of documents scored
    strictly higher (a tie counts in the right document's favour). Documents beyond the queries
    (``M > N``) are distractors.

    Args:
        query_emb: ``[N, H]`` query embeddings.
        doc_emb: ``[M, H]`` document embeddings, ``M >= N``; document ``i`` answers query ``i``.
        ks: the cut-offs of ``recall@k`` (the fraction of queries whose right document ranks ``<= k``).

    Returns:
        ``{"mrr": ..., "recall@1": ..., ...}``, fractions in [0, 1].

    Example:
        >>> q = torch.eye(3)
        >>> retrieval(q, q)
        {'mrr': 1.0, 'recall@1': 1.0}
        >>> retrieval(q, q[[1, 0, 2]])  # queries 0 and 1 find the other's document first
        {'mrr': 0.6666666666666666, 'recall@1': 0.3333333333333333}
    """
    n, m = len(query_emb), len(doc_emb)
    if n == 0 or m < n:
        raise ValueError(f"retrieval needs at least one query and one document per query; got {n} and {m}")
    q = F.normalize(query_emb.double(), dim=-1)  # (N, H)
    d = F.normalize(doc_emb.double(), dim=-1)  # (M, H)
    sim = q @ d.T  # (N, M)
    right = sim[torch.arange(n), torch.arange(n)]  # (N,)
    ranks = 1 + (sim > right[:, None]).sum(dim=1)  # (N,)
    out = {"mrr": float((1.0 / ranks.double()).mean())}
    for k in ks:
        out[f"recall@{k}"] = float((ranks <= k).double().mean())
    return out


def encode_speed(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 64,
    repeats: int = 3,
    pooling: str = "mean",
) -> float:
    """Sentences per second of the model's forward pass (with pooling) over ``sentences``.

    The sentences are tokenised once, before timing; one untimed warm-up pass over all batches, then
    the median time of ``repeats`` timed passes (``torch.cuda.synchronize`` around each on a GPU).
    Runs under ``no_grad`` in eval mode, with as many torch threads as the caller has set
    (``torch.set_num_threads``).

    Args:
        model: an ``AutoModel`` encoder.
        tokenizer: its tokenizer.
        sentences: the texts of one pass (at least one).
        batch_size: sentences per forward pass.
        max_length: tokens per sentence.
        repeats: timed passes (at least one).
        pooling: ``"mean"`` or ``"cls"``.
    """
    sentences = list(sentences)
    if not sentences or repeats < 1:
        raise ValueError(f"encode_speed needs sentences and repeats >= 1; got {len(sentences)} and {repeats}")
    batches = _batches(tokenizer, sentences, batch_size, max_length)
    device = _device(model)
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()

    def one_pass() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for b in batches:
            _forward(model, b, device, pooling, False)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    try:
        one_pass()  # warm-up
        seconds = statistics.median(one_pass() for _ in range(repeats))
    finally:
        model.train(was_training)
    return len(sentences) / max(seconds, 1e-9)


__all__ = ["encode", "encode_speed", "fidelity", "linear_probe", "retrieval"]
