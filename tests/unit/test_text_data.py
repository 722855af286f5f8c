"""Text data: corpus and splits, tokenizers and their cache, JSONL, collators, packing, arithmetic."""

import gzip
import hashlib
import os
import re

import pytest
import torch

from distillery.data.text import (
    AUSTEN_SHA256,
    AUSTEN_TITLES,
    ArithmeticConfig,
    ArithmeticTask,
    DataFormatError,
    PromptResponse,
    TokenDataset,
    TokenizerConfig,
    austen_novels,
    check_tokenizers,
    collate_pairs,
    collate_prompts,
    encode_pair,
    lm_datasets,
    load_austen,
    load_jsonl,
    pack_documents,
    pack_tokens,
    pad_right,
    same_tokenizer,
    split_austen,
    split_documents,
    train_tokenizer,
    write_jsonl,
)
from distillery.data.text import tokenizer as tokenizer_module
from distillery.data.text.arithmetic import extract_answer, solve
from distillery.errors import ConfigError, DataNotFoundError

P, B, E, X = 0, 1, 2, -100  # pad, bos, eos ids; unlabelled


@pytest.fixture(scope="module")
def byte_tok():
    return train_tokenizer("", kind="byte", use_cache=False)


@pytest.fixture(scope="module")
def small_text():
    return austen_novels()["Persuasion"][:60_000]


def _ids(text):  # byte tokenizer: id = 3 + byte value
    return [3 + b for b in text.encode()]


# ------------------------------------------------------------------------------------------------
# Collators
# ------------------------------------------------------------------------------------------------


def test_pair_layout_masks_bos_prompt_and_padding():
    rows = [
        encode_pair([10, 11], [12], bos_id=B, eos_id=E),
        encode_pair([20], [21, 22, 23], bos_id=B, eos_id=E),
    ]
    batch = pad_right([r[0] for r in rows], [r[1] for r in rows], pad_id=P)
    assert torch.equal(batch["input_ids"], torch.tensor([[B, 10, 11, 12, E, P], [B, 20, 21, 22, 23, E]]))
    assert torch.equal(batch["labels"], torch.tensor([[X, X, X, 12, E, X], [X, X, 21, 22, 23, E]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))


def test_collate_pairs_with_a_real_tokenizer(byte_tok):
    batch = collate_pairs([PromptResponse("1+1=", "2"), ("ab", "cd")], byte_tok)
    assert torch.equal(
        batch["input_ids"],
        torch.tensor([[B, *_ids("1+1="), *_ids("2"), E], [B, *_ids("ab"), *_ids("cd"), E, P]]),
    )
    assert torch.equal(
        batch["labels"], torch.tensor([[X] * 5 + [*_ids("2"), E], [X] * 3 + [*_ids("cd"), E, X]])
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 7, [1] * 6 + [0]]))


def test_truncation_keeps_the_prompt_and_cuts_the_response():
    ids, labels = encode_pair([10, 11, 12], [20, 21, 22], bos_id=B, eos_id=E, max_length=6)
    assert ids == [B, 10, 11, 12, 20, 21] and labels == [X, X, X, X, 20, 21]  # no eos: response cut
    ids, labels = encode_pair([10], [20], bos_id=B, eos_id=E, max_length=4)
    assert ids == [B, 10, 20, E] and labels == [X, X, 20, E]  # fits exactly: eos kept
    with pytest.raises(ValueError, match="leaves no room for the response"):
        encode_pair([10, 11, 12], [20], bos_id=B, eos_id=E, max_length=4)


def test_prompts_are_left_padded_for_generation(byte_tok):
    batch = collate_prompts(["12+3=", "a"], byte_tok)
    assert torch.equal(batch["input_ids"], torch.tensor([[B, *_ids("12+3=")], [P] * 4 + [B, *_ids("a")]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 6, [0] * 4 + [1, 1]]))
    cut = collate_prompts(["abcdef"], byte_tok, max_length=4)  # keeps bos and the prompt's end
    assert cut["input_ids"].tolist() == [[B, *_ids("def")]]
    bare = collate_prompts(["ab"], byte_tok, add_bos=False)
    assert bare["input_ids"].tolist() == [_ids("ab")]


def test_token_dataset_batches_and_the_training_loop(byte_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillery.losses import CrossEntropyLoss, Objective
    from distillery.models.hf import HFCausalLMAdapter
    from distillery.train import TrainConfig, fit

    pairs = [PromptResponse("1+2=", "3"), PromptResponse("10+20=", "30")]
    ds = TokenDataset.from_pairs(pairs, byte_tok)
    batch = ds.get_batch(torch.tensor([1, 0]))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 10) and batch["index"].tolist() == [1, 0]
    target, mask = HFCausalLMAdapter().rows(batch)
    assert mask.sum(1).tolist() == [3, 2]  # response tokens + eos
    assert torch.equal(target[mask], torch.tensor([*_ids("30"), E, *_ids("3"), E]))
    sub = ds.subset(torch.tensor([1]))
    assert len(sub) == 1 and sub.get_batch(torch.tensor([0]))["index"].tolist() == [1]

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=272, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=P, bos_token_id=B, eos_token_id=E,
    )  # fmt: skip
    result = fit(
        LlamaForCausalLM(config),
        ds,
        Objective({"ce": CrossEntropyLoss()}),
        TrainConfig(steps=2, batch_size=2, log_every=1),
        adapter=HFCausalLMAdapter(),
        progress=False,
    )
    assert torch.isfinite(torch.tensor(result.last_losses["ce"]))


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_packing_cuts_blocks_with_eos_separators_and_drops_only_the_tail():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    stream = [5, 6, 7, E, 8, E, 9, 10, 11, 12, E]
    for seq_len in (2, 3, 4, 11):
        blocks = pack_tokens(docs, E, seq_len)
        n = len(stream) // seq_len
        assert blocks.shape == (n, seq_len)
        assert blocks.flatten().tolist() == stream[: n * seq_len]  # order kept, nothing lost but the tail
        assert len(stream) - blocks.numel() < seq_len
    assert pack_tokens(docs, E, 12).shape == (0, 12)


def test_packed_text_dataset_uses_the_ids_as_labels(byte_tok):
    blocks = pack_documents(["abc", "de"], byte_tok, seq_len=3)
    assert blocks.tolist() == [_ids("abc"), [E, *_ids("de")]]
    ds = TokenDataset.from_blocks(blocks, byte_tok.pad_token_id)
    batch = ds.get_batch(torch.arange(2))
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
    assert ds.num_targets() == 4

    splits = split_documents({"a": "abcdefgh\n\nij", "b": "klmnopqr\n\nst"}, validation=0.0, test=0.2)
    sets = lm_datasets(splits, byte_tok, seq_len=4, names=("train", "test"))
    assert [len(sets["train"]), len(sets["test"])] == [5, 1]  # 2 x (10 + eos) = 22 tokens; 2 x 3 = 6
    assert sets["test"].get_batch(torch.tensor([0]))["input_ids"].tolist() == [[*_ids("ij"), E, *_ids("s")]]


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


def test_bpe_round_trip_specials_and_size(small_text):
    tok = train_tokenizer(small_text, vocab_size=400, use_cache=False)
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<bos>", "<eos>"]
    for text in (small_text[:3000], "  Odd   spacing,\ttabs\n\n\nand 12+345=357. ", "xyzzy QUUX"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not {0, 1, 2} & set(ids)  # encoding adds no special tokens
    assert len(tok.encode(small_text[:3000])) < 3000 * 0.6  # merges compress English text
    again = train_tokenizer(small_text, vocab_size=400, use_cache=False)
    assert same_tokenizer(tok, again)  # training is deterministic


def test_byte_tokenizer_maps_bytes_to_fixed_ids(byte_tok):
    text = "Hello £5\n"
    assert len(byte_tok) == 259 and byte_tok.encode(text) == _ids(text)
    assert byte_tok.decode(byte_tok.encode(text)) == text
    with pytest.raises(ValueError, match="fixed vocabulary of 259"):
        train_tokenizer("", kind="byte", vocab_size=300)
    with pytest.raises(ValueError, match="below the 259 ids"):
        train_tokenizer("abc", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size must be null"):
        TokenizerConfig(kind="byte", vocab_size=512)


def test_tokenizer_cache_reuses_the_trained_tokenizer(small_text, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    first = train_tokenizer(small_text, vocab_size=300)
    entries = os.listdir(tmp_path / "tokenizers")
    assert len(entries) == 1 and not entries[0].startswith(".")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_module, "_train_bpe", no_training)
    second = train_tokenizer(small_text, vocab_size=300)
    assert same_tokenizer(first, second) and second.decode(second.encode("Anne")) == "Anne"
    with pytest.raises(AssertionError, match="should have been loaded"):  # another size is another entry
        train_tokenizer(small_text, vocab_size=310)

    from transformers import AutoTokenizer  # the entry is a regular save_pretrained directory

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizers" / entries[0]))
    assert same_tokenizer(loaded, first) and loaded.pad_token == "<pad>"


def test_tokenizer_cache_writes_atomically(small_text, tmp_path, monkeypatch):
    root = tmp_path / "tokenizers"
    from transformers import PreTrainedTokenizerFast

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
        with pytest.raises(OSError, match="disk full"):
            train_tokenizer(small_text, vocab_size=300, cache_dir=root)
    assert os.listdir(root) == []  # neither a half-written entry nor a temporary directory is left
    tok = train_tokenizer(small_text, vocab_size=300, cache_dir=root)
    assert len(os.listdir(root)) == 1 and len(tok) == 300


def test_check_tokenizers_accepts_the_same_and_refuses_different(small_text, byte_tok):
    bpe = train_tokenizer(small_text, vocab_size=300, use_cache=False)
    assert check_tokenizers(bpe, train_tokenizer(small_text, vocab_size=300, use_cache=False)) == 300
    # the models' output layers may be wider than the tokenizer (padded vocabularies)
    assert check_tokenizers(bpe, bpe, teacher_vocab_size=320, student_vocab_size=384) == 300
    with pytest.raises(ConfigError, match="student model's vocab_size=299 is smaller"):
        check_tokenizers(bpe, bpe, student_vocab_size=299)
    with pytest.raises(ConfigError, match="Cross-tokenizer distillation is not supported") as err:
        check_tokenizers(bpe, byte_tok)
    assert "vocabulary (300 vs 259 entries)" in str(err.value)
    other = train_tokenizer(small_text[::-1], vocab_size=300, use_cache=False)  # same size, other merges
    assert not same_tokenizer(bpe, other)
    with pytest.raises(ConfigError, match="merges"):
        check_tokenizers(bpe, other)


# ------------------------------------------------------------------------------------------------
# Austen corpus
# ------------------------------------------------------------------------------------------------


def test_austen_loads_with_its_checksum_and_splits_deterministically():
    text = load_austen()
    assert hashlib.sha256(text.encode()).hexdigest() == AUSTEN_SHA256 and len(text.splitlines()) == 73_428
    novels = austen_novels(text)
    assert tuple(novels) == AUSTEN_TITLES and "".join(novels.values()) == text
    splits = split_austen()
    assert splits.sizes() == {"train": 3_635_773, "validation": 193_435, "test": 195_826}
    assert split_austen() == splits
    for title, train, val, test in zip(splits.titles, splits.train, splits.validation, splits.test):
        assert train + val + test == novels[title]  # contiguous, disjoint, complete
        assert 0.03 < len(val) / len(novels[title]) < 0.07 and 0.03 < len(test) / len(novels[title]) < 0.07
        assert train.endswith("\n\n") and val.endswith("\n\n")  # cut at paragraph breaks


def test_split_documents_checks_fractions():
    assert split_documents({"a": "x\n\ny"}, validation=0.0, test=0.0).train == ("x\n\ny",)
    with pytest.raises(ValueError, match="leave some text for training"):
        split_documents({"a": "x"}, validation=0.5, test=0.5)


def test_austen_errors_on_missing_or_corrupt_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="is missing"):
        load_austen(tmp_path / "nope.txt.gz")
    wrong = tmp_path / "wrong.txt.gz"
    with gzip.open(wrong, "wb") as fh:
        fh.write(b"not the novels")
    with pytest.raises(DataNotFoundError, match="SHA-256 is"):
        load_austen(wrong)
    junk = tmp_path / "junk.txt.gz"
    junk.write_bytes(b"plain bytes")
    with pytest.raises(DataNotFoundError, match="not a readable gzip file"):
        load_austen(junk)


# ------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------


def test_jsonl_round_trip_and_line_numbered_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [PromptResponse("Q: hi\n", "Élan"), PromptResponse("", "x")]
    write_jsonl(path, pairs)
    assert load_jsonl(path) == pairs

    cases = {
        '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": }\n': ":3: not valid JSON",
        '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n': ":2: missing key(s) 'response'",
        '["a", "b"]\n': ":1: expected an object",
        '{"prompt": "a", "response": 3}\n': ":1: 'response' must be a string",
    }
    for content, message in cases.items():
        path.write_text(content)
        with pytest.raises(DataFormatError) as err:
            load_jsonl(path)
        assert str(err.value).startswith(str(path)) and message in str(err.value)
    with pytest.raises(DataNotFoundError):
        load_jsonl(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------


def test_arithmetic_is_deterministic_with_disjoint_splits():
    task = ArithmeticTask(digits=(1, 3), ops=("+", "-", "*"), seed=7)
    train, test = task.split(n_train=500, n_test=100)
    assert (len(train), len(test)) == (500, 100)
    assert task.split(n_train=500, n_test=100) == (train, test)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.prompt for p in train}) == 500
    assert task.split(n_train=50, n_test=100)[1] == test  # the test split does not depend on n_train
    assert ArithmeticTask(digits=(1, 3), ops=("+", "-", "*"), seed=8).split(500, 100)[1] != test
    assert all(solve(p.prompt) == p.response and task.verify(p.prompt, p.response) for p in train + test)
    assert {re.search(r"[-+*]", p.prompt).group() for p in train} == {"+", "-", "*"}


def test_arithmetic_space_is_exhausted_exactly():
    task = ArithmeticTask(digits=(1, 1), ops=("+",), seed=0)
    assert task.num_problems == 100
    train, test = task.split(n_train=90, n_test=10)
    assert len({p.prompt for p in train + test}) == 100
    with pytest.raises(ValueError, match="allow only 100"):
        task.split(n_train=91, n_test=10)
    with pytest.raises(ValueError, match="train \\+ test = 101 exceeds"):
        ArithmeticConfig(digits=(1, 1), train=91, test=10)
    with pytest.raises(ValueError, match="unknown operator"):
        ArithmeticConfig(ops=("/",))
    assert ArithmeticConfig(digits=(2, 2), train=10, test=5).build().num_problems == 90 * 90


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("357", True),
        (" 357 ", True),
        ("357<eos><pad><pad>", True),
        ("357\n1+1=2", True),
        ("357 <eos>", True),
        ("3570", False),
        ("0357", False),
        ("357.0", False),
        ("35 7", False),
        ("", False),
        ("\n357", False),
        ("-357", False),
    ],
)
def test_verifier_is_exact_match(completion, ok):
    assert ArithmeticTask().verify("12+345=", completion) is ok


def test_verifier_helpers():
    assert solve("3-12=") == "-9" and solve(" 7 * 8 = ") == "56"
    assert (
        extract_answer("42</s>junk", eos="</s>") == "42" and extract_answer("42<eos>", eos=None) == "42<eos>"
    )
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        solve("12+345")
    task = ArithmeticTask()
    assert task.accuracy(["1+1=", "2+2=", "3*3="], ["2", "4<eos>", "6"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.accuracy(["1+1=", "2+2="], ["2"])


def test_reversed_answers_are_the_same_problems_written_backwards():
    plain = ArithmeticTask(digits=(1, 3), ops=("+", "-", "*"), seed=3)
    rev = ArithmeticTask(digits=(1, 3), ops=("+", "-", "*"), seed=3, reverse=True)
    a, b = plain.problems(300), rev.problems(300)
    assert [p.prompt for p in a] == [p.prompt for p in b]  # the format does not change the draw
    for p, q in zip(a, b):
        sign = "-" if p.response.startswith("-") else ""
        assert q.response == sign + p.response.lstrip("-")[::-1]
        assert rev.verify(q.prompt, q.response)
        assert plain.verify(q.prompt, q.response) == (q.response == p.response)  # palindromes pass both
    assert any(q.response != p.response for p, q in zip(a, b))
    assert solve("12+345=", reverse=True) == "753" and solve("3-15=", reverse=True) == "-21"
    assert solve("50+50=", reverse=True) == "001"  # leading zeros of the reversed text are part of it
    assert rev.verify("12+345=", "753<eos>") and not rev.verify("12+345=", "357")
    assert rev.accuracy(["1+9=", "2+2="], ["01", "4"]) == 1.0
    assert ArithmeticConfig(reverse=True, train=10, test=5).build().reverse
    assert "reverse=True" in repr(rev)
