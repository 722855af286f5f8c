"""Encoder metrics: fidelity (Spearman), retrieval (MRR, recall@k), linear probe, encode, speed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from distillery.eval.encoder import encode, encode_speed, fidelity, linear_probe, retrieval
from distillery.models.encoder import pool

WORDS = "the a cat dog bird sat ran flew on in mat tree river big small red old is and very".split()
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran",
    "the big red bird flew over the old tree",
    "a tree",
    "the",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config), tokenizer


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of distinct values (no ties), 0-based."""
    out = np.empty(len(x))
    out[np.argsort(x)] = np.arange(len(x))
    return out


def test_fidelity_identical_and_naive():
    a, b = torch.randn(30, 8), torch.randn(30, 8)
    assert fidelity(a, b, a, b) == pytest.approx(1.0)
    assert fidelity(a, b, a.neg(), b.neg()) == pytest.approx(1.0)  # cosines unchanged
    sa, sb = a + 0.8 * torch.randn(30, 8), b + 0.8 * torch.randn(30, 8)
    s_cos = [float(torch.dot(x, y) / (x.norm() * y.norm())) for x, y in zip(sa, sb)]
    t_cos = [float(torch.dot(x, y) / (x.norm() * y.norm())) for x, y in zip(a, b)]
    naive = np.corrcoef(ranks(np.array(s_cos)), ranks(np.array(t_cos)))[0, 1]  # Pearson of the ranks
    assert fidelity(sa, sb, a, b) == pytest.approx(naive, abs=1e-9)
    # the student may be narrower than the teacher
    assert -1.0 <= fidelity(sa[:, :4], sb[:, :4], a, b) <= 1.0
    with pytest.raises(ValueError, match="same number"):
        fidelity(a, b[:5], a, b)


def naive_retrieval(q: torch.Tensor, d: torch.Tensor, ks=(1, 3)):
    reciprocal, hits = [], {k: [] for k in ks}
    for i in range(len(q)):
        scores = [float(torch.dot(q[i], d[j]) / (q[i].norm() * d[j].norm())) for j in range(len(d))]
        rank = 1 + sum(1 for s in scores if s > scores[i])
        reciprocal.append(1.0 / rank)
        for k in ks:
            hits[k].append(rank <= k)
    return {"mrr": sum(reciprocal) / len(q), **{f"recall@{k}": sum(hits[k]) / len(q) for k in ks}}


def test_retrieval():
    q = torch.randn(12, 6)
    assert retrieval(q, q) == {"mrr": 1.0, "recall@1": 1.0}
    assert retrieval(q, 2.0 * q) == {"mrr": 1.0, "recall@1": 1.0}
    d = q + 1.5 * torch.randn(12, 6)
    got, want = retrieval(q, d, ks=(1, 3)), naive_retrieval(q.double(), d.double())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    distractors = torch.cat([d, torch.randn(5, 6)])  # documents beyond the queries compete too
    got = retrieval(q, distractors, ks=(1, 3))
    want = naive_retrieval(q.double(), distractors.double())
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    with pytest.raises(ValueError):
        retrieval(q, q[:3])


def test_linear_probe_separable():
    gen = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(6, 16, generator=gen)
    labels = torch.arange(6).repeat_interleave(40)
    x = centres[labels] + torch.randn(240, 16, generator=gen)
    train, test = torch.arange(240) % 2 == 0, torch.arange(240) % 2 == 1
    acc = linear_probe(x[train], labels[train], x[test], labels[test], seed=0)
    assert acc > 0.9
    assert acc == linear_probe(x[train], labels[train], x[test], labels[test], seed=0)
    chance = linear_probe(torch.randn(120, 16), labels[train], torch.randn(120, 16), labels[test])
    assert chance < 0.5


def test_encode_matches_pool_and_restores_mode(tiny):
    model, tokenizer = tiny
    model.train()
    out = encode(model, tokenizer, SENTENCES, batch_size=2)
    assert model.training  # mode restored
    assert out.shape == (len(SENTENCES), 32) and out.dtype == torch.float32 and not out.requires_grad
    model.eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # padding length does not matter
    unit = encode(model, tokenizer, SENTENCES, pooling="cls", normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(SENTENCES)))
    assert encode(model, tokenizer, []).shape == (0, 32)


def test_encode_speed_positive(tiny):
    model, tokenizer = tiny
    speed = encode_speed(model, tokenizer, SENTENCES * 4, batch_size=8, max_length=16, repeats=2)
    assert speed > 0 and math.isfinite(speed)
    with pytest.raises(ValueError):
        encode_speed(model, tokenizer, [], repeats=1)
