"""Generation for LM distillation: prompts/completions layout, GKD on-policy batches, SKD, sequence-level KD."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distillery.data.text import TokenDataset, pad_left, train_tokenizer
from distillery.generation import (
    OnPolicyBatches,
    SpeculativeBatches,
    build_batch,
    generate_completions,
    sequence_level_pairs,
    speculative_completions,
    split_prompts,
)
from distillery.generation import sampling as sampling_module
from distillery.generation.speculative import _Decoder
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.teachers import FrozenTeacher

PAD, BOS, EOS = 0, 1, 2
VOCAB = 32


def tiny_lm(seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    model = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), vocab)
    for name, value in (("pad", PAD), ("bos", BOS), ("eos", EOS)):
        setattr(model.config, f"{name}_token_id", value)
        setattr(model.generation_config, f"{name}_token_id", value)
    return model


def prompt_response_batch() -> dict[str, torch.Tensor]:
    """Three rows ``[bos] prompt response [eos]`` of different lengths, as TokenDataset lays them out."""
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([15, 16], [17])]
    rows = [[BOS, *p, *r, EOS] for p, r in pairs]
    labels = [[-100] * (1 + len(p)) + [*r, EOS] for p, r in pairs]
    return TokenDataset(rows, labels, pad_id=PAD).get_batch(torch.tensor([2, 0, 1]))


class GenerateSpy:
    """Wraps ``model.generate``: counts calls, records outputs and the model's mode during the call."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.inner = model, model.generate
        self.calls, self.outputs, self.training = 0, [], []
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.training.append(self.model.training)
        out = self.inner(*args, **kwargs)
        self.outputs.append((kwargs["input_ids"].shape[1], out))
        return out

    def completions(self) -> list[list[int]]:
        """Generated ids of the last call, cut after the first <eos>."""
        width, out = self.outputs[-1]
        rows = out[:, width:].tolist()
        return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


# ----------------------------------------------------------------------------------------------------
# Layout: prompts out of a batch, completions back in
# ----------------------------------------------------------------------------------------------------


def test_split_prompts_then_build_batch_rebuilds_a_token_dataset_batch():
    batch = prompt_response_batch()
    prompts = split_prompts(batch)
    assert prompts == [[BOS, 15, 16], [BOS, 5, 6, 7], [BOS, 10]]
    responses = [[17, EOS], [8, 9, EOS], [11, 12, 13, 14, EOS]]
    rebuilt = build_batch(prompts, responses, pad_id=PAD, index=batch["index"])
    assert rebuilt.keys() == batch.keys()
    for key in batch:
        assert torch.equal(rebuilt[key], batch[key]), key


def test_build_batch_adds_bos_when_asked_and_rejects_empty_completions():
    b = build_batch([[5], [BOS, 6]], [[7], [8, EOS]], pad_id=PAD, bos_id=BOS)
    assert b["input_ids"].tolist() == [[BOS, 5, 7, PAD], [BOS, 6, 8, EOS]]
    assert b["labels"].tolist() == [[-100, -100, 7, -100], [-100, -100, 8, EOS]]
    with pytest.raises(ValueError, match="completion 0 is empty"):
        build_batch([[BOS]], [[]], pad_id=PAD)


def test_split_prompts_needs_a_response_in_every_row():
    batch = {"input_ids": torch.tensor([[BOS, 5, 6]]), "labels": torch.tensor([[-100, -100, -100]])}
    with pytest.raises(ValueError, match="row 0"):
        split_prompts(batch)


def test_generate_completions_is_seeded_cut_at_eos_and_leaves_the_global_rng_alone():
    model = tiny_lm()
    prompts = [[BOS, 5, 6], [BOS, 7]]
    state = torch.get_rng_state()
    a = generate_completions(model, prompts, max_new_tokens=6, seed=3, eos_id=EOS, pad_id=PAD)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_completions(model, prompts, max_new_tokens=6, seed=3, eos_id=EOS, pad_id=PAD)
    assert a == b and len(a) == 2
    for c in a:
        assert 1 <= len(c) <= 6
        assert EOS not in c[:-1]
        assert c[-1] == EOS or len(c) == 6
    # Greedy decoding needs no seed.
    greedy = generate_completions(model, prompts, max_new_tokens=4, do_sample=False, eos_id=EOS, pad_id=PAD)
    assert greedy == generate_completions(
        model, prompts, max_new_tokens=4, do_sample=False, eos_id=EOS, pad_id=PAD
    )


# ----------------------------------------------------------------------------------------------------
# GKD: on-policy batches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_lambda", [0.0, 0.3, 0.5, 1.0])
def test_on_policy_fraction_matches_lambda_and_is_reproducible(student_lambda):
    transform = OnPolicyBatches(student_lambda, max_new_tokens=4, seed=11, pad_id=PAD, eos_id=EOS)
    decisions = [transform.decide(step) for step in range(4000)]
    fraction = sum(decisions) / len(decisions)
    assert abs(fraction - student_lambda) < 0.025  # ~3 standard deviations at n=4000
    again = OnPolicyBatches(student_lambda, max_new_tokens=4, seed=11, pad_id=PAD, eos_id=EOS)
    assert [again.decide(step) for step in range(4000)] == decisions  # resumable: a function of (seed, step)
    if 0 < student_lambda < 1:
        other = OnPolicyBatches(student_lambda, max_new_tokens=4, seed=12, pad_id=PAD, eos_id=EOS)
        assert [other.decide(step) for step in range(4000)] != decisions


def test_lambda_zero_returns_the_batch_unchanged_without_generating():
    model, batch = tiny_lm(), prompt_response_batch()
    spy = GenerateSpy(model)
    transform = OnPolicyBatches(0.0, max_new_tokens=4, seed=0, pad_id=PAD, eos_id=EOS)
    for step in range(5):
        assert transform(batch, model, step) is batch
        assert transform.metrics()["on_policy"] == 0.0
    assert spy.calls == 0 and transform.metrics()["on_policy_fraction"] == 0.0


def test_lambda_one_replaces_every_response_with_the_students_samples():
    model, batch = tiny_lm(), prompt_response_batch()
    original = {k: v.clone() for k, v in batch.items()}
    prompts = split_prompts(batch)
    spy = GenerateSpy(model)
    transform = OnPolicyBatches(1.0, max_new_tokens=5, seed=0, pad_id=PAD, eos_id=EOS)
    for step in range(3):
        out = transform(batch, model, step)
        assert transform.metrics()["on_policy"] == 1.0
        assert all(torch.equal(batch[k], original[k]) for k in batch)  # the input batch is not modified
        assert torch.equal(out["index"], batch["index"])
        completions = spy.completions()
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            n, m = len(prompt), len(completion)
            ids, labels, mask = out["input_ids"][i], out["labels"][i], out["attention_mask"][i]
            assert ids[:n].tolist() == prompt  # prompt kept
            assert (labels[:n] == -100).all()  # prompt masked
            assert ids[n : n + m].tolist() == completion == labels[n : n + m].tolist()  # labels = samples
            assert (labels[n + m :] == -100).all() and (mask[n + m :] == 0).all()  # padding masked
            assert (mask[: n + m] == 1).all()
    assert spy.calls == 3 and transform.metrics()["on_policy_fraction"] == 1.0


def test_on_policy_batches_are_deterministic_given_seed_step_and_batch():
    model, batch = tiny_lm(), prompt_response_batch()
    first = OnPolicyBatches(1.0, max_new_tokens=6, seed=5, pad_id=PAD, eos_id=EOS)(batch, model, 7)
    torch.rand(10)  # the global RNG does not matter
    second = OnPolicyBatches(1.0, max_new_tokens=6, seed=5, pad_id=PAD, eos_id=EOS)(batch, model, 7)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("training", [True, False])
def test_sampling_records_no_gradient_and_restores_the_students_mode(training):
    model, batch = tiny_lm(), prompt_response_batch()
    model.train(training)
    spy = GenerateSpy(model)
    out = OnPolicyBatches(1.0, max_new_tokens=4, seed=0, pad_id=PAD, eos_id=EOS)(batch, model, 0)
    assert spy.training == [False]  # sampled in eval mode
    assert model.training is training
    assert not any(v.requires_grad for v in out.values())
    assert all(p.grad is None for p in model.parameters())
    # The sampled ids are ordinary tensors: a training forward/backward on them works.
    loss = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"], labels=out["labels"]).loss
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_the_teacher_scores_exactly_the_sampled_tokens_in_one_forward():
    student, teacher_lm, batch = tiny_lm(0), tiny_lm(1), prompt_response_batch()
    spy = GenerateSpy(student)
    out = OnPolicyBatches(1.0, max_new_tokens=5, seed=2, pad_id=PAD, eos_id=EOS)(batch, student, 0)
    adapter = HFCausalLMAdapter()
    target, mask = adapter.rows(out)  # (B, T-1)
    assert [target[i][mask[i]].tolist() for i in range(len(target))] == spy.completions()

    calls = []
    teacher_lm.register_forward_hook(lambda *_: calls.append(1))
    teacher = FrozenTeacher(teacher_lm, adapter)
    t_logits = teacher(out).logits
    s_logits = adapter.forward(student, out).logits
    assert len(calls) == 1
    assert t_logits.shape == s_logits.shape == (*target.shape, VOCAB)


def test_per_token_extra_keys_are_refused():
    model, batch = tiny_lm(), prompt_response_batch()
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    with pytest.raises(ValueError, match="position_ids"):
        OnPolicyBatches(1.0, max_new_tokens=2, pad_id=PAD, eos_id=EOS)(batch, model, 0)


# ----------------------------------------------------------------------------------------------------
# SKD: speculative interleaving
# ----------------------------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """An HF-like stub: the next-token logits of row ``i`` at generated position ``j`` are given.

    ``schedule[i][j]`` is a token id (a one-hot, very peaked distribution) or a full logit vector.
    It has no KV cache, so the decoder recomputes from the whole prefix.
    """

    def __init__(self, schedule, prompt_width: int, vocab: int = VOCAB) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.schedule, self.prompt_width, self.vocab = schedule, prompt_width, vocab
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls += 1
        b, length = input_ids.shape
        j = length - self.prompt_width
        logits = torch.zeros(b, length, self.vocab)
        for i in range(b):
            entry = self.schedule[i][min(j, len(self.schedule[i]) - 1)]
            if isinstance(entry, int):
                logits[i, -1, entry] = 100.0
            else:
                logits[i, -1] = torch.as_tensor(entry, dtype=torch.float32)
        return SimpleNamespace(logits=logits)


def teacher_logits_top3() -> torch.Tensor:
    """Teacher: top-3 = {3, 4, eos}, with 3 far ahead (so a replacement is 3)."""
    z = torch.zeros(VOCAB)
    z[3], z[4], z[EOS] = 60.0, 50.0, 49.0
    return z


def test_speculative_keeps_proposals_in_the_teachers_top_k_and_replaces_the_rest():
    prompts = [[BOS, 5], [BOS, 6]]  # both width 2: no padding
    # Row 0 proposes 4 (kept), 7 (replaced), 4 (kept), eos (kept: in the top-3) and stops.
    # Row 1 proposes 7, 7 (replaced), then 4 four times (kept) until max_new_tokens.
    student = FixedLogits([[4, 7, 4, EOS], [7, 7, 4, 4, 4, 4]], prompt_width=2)
    teacher = FixedLogits([[teacher_logits_top3()]] * 2, prompt_width=2)
    out = speculative_completions(
        student, teacher, prompts, max_new_tokens=6, top_k=3, temperature=1.0, seed=0, eos_id=EOS, pad_id=PAD
    )
    assert out.completions == [[4, 3, 4, EOS], [3, 3, 4, 4, 4, 4]]
    assert out.replaced.tolist() == [
        [False, True, False, False, False, False],  # row 0 ended after 4 tokens
        [True, True, False, False, False, False],
    ]
    assert out.acceptance_rate == pytest.approx(7 / 10)  # (3 + 4) kept of (4 + 6) proposed
    # top_k = 1: only the teacher's argmax (3) is accepted
    narrow = speculative_completions(
        student, teacher, prompts, max_new_tokens=3, top_k=1, seed=0, eos_id=EOS, pad_id=PAD
    )
    assert narrow.completions == [[3, 3, 3], [3, 3, 3]] and narrow.acceptance_rate == 0.0


def test_speculative_replacements_are_sampled_from_the_teacher():
    # The teacher's distribution: 3 and 4 equally likely, everything else impossible; the student
    # always proposes 7, outside the teacher's top-2, so every token is a teacher sample.
    z = torch.full((VOCAB,), -1e4)
    z[3] = z[4] = 0.0
    student = FixedLogits([[7] * 200], prompt_width=2)
    teacher = FixedLogits([[z]], prompt_width=2)
    out = speculative_completions(
        student, teacher, [[BOS, 5]], max_new_tokens=200, top_k=2, seed=1, eos_id=EOS, pad_id=PAD
    )
    tokens = out.completions[0]
    assert set(tokens) == {3, 4} and out.replaced.all()
    assert abs(tokens.count(3) / len(tokens) - 0.5) < 0.15


def test_speculative_with_llamas_cached_equals_recomputed_and_kept_tokens_are_in_the_top_k():
    student, teacher = tiny_lm(0), tiny_lm(1)
    prompts = [[BOS, 5, 6, 7], [BOS, 8], [BOS, 9, 10]]  # left padding in play
    kwargs = dict(max_new_tokens=6, top_k=10, temperature=1.0, seed=1, eos_id=EOS, pad_id=PAD)
    cached = speculative_completions(student, teacher, prompts, use_cache=True, **kwargs)
    recomputed = speculative_completions(student, teacher, prompts, use_cache=False, **kwargs)
    assert cached.completions == recomputed.completions
    assert torch.equal(cached.replaced, recomputed.replaced)
    # Independent check with one full teacher forward on the finished rows (right padded): every
    # kept token lies in the teacher's top-3 at its position.
    batch = build_batch(prompts, cached.completions, pad_id=PAD)
    adapter = HFCausalLMAdapter()
    with torch.no_grad():
        logits = adapter.forward(teacher, batch).logits  # (B, T-1, V)
    target, mask = adapter.rows(batch)
    kept = proposals = 0
    for i in range(len(prompts)):
        positions = mask[i].nonzero()[:, 0]
        for j, pos in enumerate(positions.tolist()):
            proposals += 1
            in_top = int(target[i, pos]) in logits[i, pos].topk(10).indices.tolist()
            if not cached.replaced[i, j]:
                kept += 1
                assert in_top
    assert cached.acceptance_rate == pytest.approx(kept / proposals)
    assert 0 < cached.acceptance_rate < 1 and proposals == sum(len(c) for c in cached.completions)


@pytest.mark.parametrize("use_cache", [True, False])
def test_incremental_decoding_of_left_padded_prompts_matches_a_full_forward(use_cache):
    model = tiny_lm(0).eval()
    prompts, extra = [[BOS, 5, 6, 7], [BOS, 8]], torch.tensor([[9, 10, 11], [12, 13, 14]])
    enc = pad_left(prompts, PAD)
    with torch.no_grad():
        decoder = _Decoder(model, enc["input_ids"], enc["attention_mask"], use_cache)
        assert (decoder.past is not None) is use_cache
        steps = [decoder.logits]
        for j in range(extra.shape[1]):
            decoder.append(extra[:, j])
            steps.append(decoder.logits)
        for i, prompt in enumerate(prompts):  # reference: the unpadded row on its own
            row = torch.tensor([[*prompt, *extra[i].tolist()]])
            full = model(input_ids=row).logits[0]  # (L, V)
            for j, logits in enumerate(steps):
                torch.testing.assert_close(logits[i], full[len(prompt) - 1 + j], atol=1e-5, rtol=1e-4)


def test_speculative_batches_transform_keeps_prompts_and_reports_acceptance():
    student, teacher_lm, batch = tiny_lm(0), tiny_lm(1), prompt_response_batch()
    student.train()
    transform = SpeculativeBatches(
        FrozenTeacher(teacher_lm, HFCausalLMAdapter()), top_k=VOCAB, max_new_tokens=4, seed=0
    )
    out = transform(batch, student, step=0)
    assert student.training
    prompts = split_prompts(batch)
    assert split_prompts(out) == prompts
    metrics = transform.metrics()
    assert metrics["on_policy"] == 1.0 and metrics["acceptance_rate"] == 1.0  # top_k = vocab: all kept
    assert transform.last_sample is not None and not transform.last_sample.replaced.any()


# ----------------------------------------------------------------------------------------------------
# Sequence-level KD: teacher responses generated once, cached as JSONL
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer():
    return train_tokenizer("", kind="byte", use_cache=False)


def test_sequence_level_pairs_are_generated_once_cached_and_reused(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    torch.manual_seed(0)
    teacher = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), len(tok), tok)
    spy = GenerateSpy(teacher)
    prompts = ["ab", "c", "def"]
    kwargs = dict(cache_dir=tmp_path, max_new_tokens=5, batch_size=2)
    pairs = sequence_level_pairs(teacher, prompts, tok, **kwargs)
    assert spy.calls == 2  # ceil(3 / 2) batched calls
    assert [p.prompt for p in pairs] == prompts
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("seqkd-") and files[0].endswith(".jsonl")
    records = [json.loads(line) for line in (tmp_path / files[0]).read_text().splitlines()]
    assert [r["response"] for r in records] == [p.response for p in pairs]
    assert all(isinstance(r["finished"], bool) for r in records)

    again = sequence_level_pairs(FrozenTeacher(teacher), prompts, tok, **kwargs)  # a wrapper works too
    assert spy.calls == 2 and again == pairs  # read from the file, no generation
    assert len(TokenDataset.from_pairs(again, tok)) == 3

    sequence_level_pairs(teacher, prompts, tok, cache_dir=tmp_path, max_new_tokens=4, batch_size=2)
    assert spy.calls == 4  # another generation setting: another file
    with torch.no_grad():
        teacher.model.norm.weight.add_(1.0)
    sequence_level_pairs(teacher, prompts, tok, **kwargs)
    assert spy.calls == 6 and len(os.listdir(tmp_path)) == 3  # other weights: generated again


def test_sequence_level_file_is_written_atomically(tmp_path, byte_tokenizer, monkeypatch):
    tok = byte_tokenizer
    teacher = build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), len(tok), tok)

    def crash(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(sampling_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        sequence_level_pairs(teacher, ["ab"], tok, cache_dir=tmp_path, max_new_tokens=2)
    assert os.listdir(tmp_path) == []  # neither a partial file nor a temporary one is left


# ----------------------------------------------------------------------------------------------------
# Through the training loop: GKD with lambda = 0.5 resumes exactly
# ----------------------------------------------------------------------------------------------------


class _Halt(Exception):
    pass


def test_on_policy_training_resumes_exactly(tmp_path):
    from distillery.losses import build_objective
    from distillery.losses.logit import JSDConfig
    from distillery.train import fit
    from distillery.train.config import TrainConfig

    pairs = [([5 + i % 7, 6], [8 + i % 5, 9]) for i in range(16)]
    ds = TokenDataset(
        [[BOS, *p, *r, EOS] for p, r in pairs],
        [[-100] * (1 + len(p)) + [*r, EOS] for p, r in pairs],
        pad_id=PAD,
    )

    def run(run_dir, resume=False, on_step=None):
        student, transform = tiny_lm(0), OnPolicyBatches(0.5, max_new_tokens=4, seed=0)
        cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, eval_every=0, checkpoint_every=2)
        fit(
            student,
            ds,
            build_objective({"jsd": JSDConfig()}),
            cfg,
            teacher=FrozenTeacher(tiny_lm(1), HFCausalLMAdapter()),
            adapter=HFCausalLMAdapter(),
            run_dir=run_dir,
            resume=resume,
            progress=False,
            tensorboard=False,
            on_step=on_step,
            batch_transform=transform,
        )
        return student, transform

    straight, transform = run(tmp_path / "a")
    assert 0 < transform.sampled_batches < transform.batches  # both kinds of steps happened
    assert transform.decide(2) or transform.decide(3)  # the resumed half samples too

    def halt(step):
        if step == 2:
            raise _Halt

    with pytest.raises(_Halt):
        run(tmp_path / "b", on_step=halt)
    resumed, _ = run(tmp_path / "b", resume=True)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_sampling_restores_the_mode_of_every_submodule():
    model, batch = tiny_lm(), prompt_response_batch()
    model.train()
    model.model.layers[0].eval()  # a frozen block stays in eval
    OnPolicyBatches(1.0, max_new_tokens=2, pad_id=PAD, eos_id=EOS)(batch, model, 0)
    assert model.training and model.model.embed_tokens.training
    assert not model.model.layers[0].training and not model.model.layers[0].self_attn.training
