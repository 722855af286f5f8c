"""Classification on the user's own files (``data: {name: files}``), end to end through the CLI: every
table format with a text field and a features field, text models and a pretrained sequence classifier
with their own tokenizers, the splits (validation never touches test rows), the teacher cache key (a
changed file trains a new teacher), bad inputs (exit 2, no run folder left behind) and the shipped
recipe in a reduced setting. Tiny files and models, a few steps each."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from distillery.cli import main
from distillery.config import load_config
from distillery.data import FilesDataConfig, ImageDataConfig, UserData, load_classification_data
from distillery.data.user import TEXT_PAD

pytestmark = pytest.mark.integration

POS, NEG = ["great", "lovely", "superb", "fun"], ["awful", "boring", "dull", "poor"]
FILLER = ["the", "film", "was", "really", "plot", "acting", "and", "a", "very", "story"]
STEPS = {"steps": 8, "batch_size": 16}


def _texts(n: int, seed: int) -> list[dict]:
    """``n`` short reviews, half positive: filler words around one or two sentiment words (learnable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, rng.randint(2, 6)) + rng.sample(
            POS if label == "pos" else NEG, rng.randint(1, 2)
        )
        rng.shuffle(words)
        rows.append({"text": f"{' '.join(words)} #{seed}-{i}", "label": label})  # every text distinct
    return rows


def _features(n: int, seed: int, dim: int = 16) -> list[dict]:
    """``n`` rows of ``dim`` numbers around a class mean (3 classes); the first number is a unique id."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, dim, generator=g) * 0.5 + torch.nn.functional.one_hot(y, dim).float() * 2
    x[:, 0] = seed * 10_000 + torch.arange(n)
    return [{"x": x[i].tolist(), "label": int(y[i])} for i in range(n)]


def _write(rows: list[dict], path, fmt: str, columns: bool = False):
    """``rows`` as a CSV / JSONL / Parquet file or a save_to_disk folder (``columns``: x as x0..x15)."""
    import datasets

    if columns:
        rows = [{**{f"x{j}": v for j, v in enumerate(r["x"])}, "label": r["label"]} for r in rows]
    table = datasets.Dataset.from_list(rows)
    if fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return str(path)


def _run(tmp_path, data: dict, student: dict, teacher: dict | None, name: str = "run", extra=()) -> int:
    cfg = {
        "name": "user-data",
        "seeds": [0],
        "data": {"name": "files", "validation": 4, **data},
        "student": student,
        "train": {**STEPS, "eval_every": 4, "optimizer": {"name": "adamw", "lr": 0.01}},
        "baseline": {"enabled": True},
    }
    if teacher is not None:
        cfg["teacher"] = {"model": teacher, "train": {**STEPS, "eval_every": 0}}
        cfg["loss"] = {"ce": {"weight": 0.5}, "forward_kl": {"weight": 0.5, "temperature": 2.0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["run", str(path), "--no-progress", f"output.dir={tmp_path / name}", *extra])


def _task(cfg, tmp_path):
    from rich.console import Console

    from distillery.tasks import RunContext, task_class
    from distillery.train import make_accelerator

    context = RunContext(make_accelerator(), Console(quiet=True), False, tmp_path)
    return task_class(cfg.task)(cfg, context)


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())["models"]


BOW = {"name": "bow_mlp", "tokenizer": {"kind": "bpe", "vocab_size": 300}, "embed_dim": 8}
CNN_BYTES = {
    "name": "text_cnn",
    "tokenizer": {"kind": "byte"},
    "embed_dim": 8,
    "channels": 8,
    "kernel_sizes": [2, 3],
}
MLP = {"name": "mlp", "hidden": [16]}


# ---- every format, end to end -------------------------------------------------------------------


def test_text_csv_with_teacher_and_student_on_their_own_tokenizers(tmp_path):
    train = _write(_texts(60, 0), tmp_path / "train.csv", "csv")
    assert (
        _run(tmp_path, {"train": train, "text_field": "text", "labels": ["neg", "pos"]}, BOW, CNN_BYTES) == 0
    )
    out = tmp_path / "run"
    models = _summary(out)
    assert {"teacher", "baseline", "distilled"} <= set(models)
    for arm in ("baseline", "distilled"):
        assert (out / "seed-0" / arm / "student.safetensors").is_file()
        assert (
            out / "seed-0" / arm / "tokenizer" / "tokenizer.json"
        ).is_file()  # the student's, saved beside it
    # test carved from train.csv (default 20%: 12 rows), validation 4 per seed, the rest labelled
    cfg = load_config(str(tmp_path / "run.yaml"))
    data = UserData(cfg.data)
    assert (len(data.pool), len(data.test)) == (48, 12)
    task = _task(cfg, tmp_path)  # byte ids for the teacher, BPE ids for the student: two batch keys
    assert task.teacher_adapter.input_key == "x_teacher" and task.adapter.input_key == "x"
    batch = task.prepare(0).splits.distillation_set().get_batch(torch.arange(4))
    assert int(batch["x_teacher"].max()) < 259 <= len(task.user.tokenizers["x"])
    assert not torch.equal(batch["x"][:, :3], batch["x_teacher"][:, :3])
    from distillery.experiment import evaluate_run

    again = evaluate_run(out).summary["models"]  # students reloaded, tokenizers rebuilt from the files
    for arm in ("baseline", "distilled"):
        assert again[arm]["accuracy"]["mean"] == pytest.approx(models[arm]["accuracy"]["mean"])
    assert again[arm]["agreement"]["mean"] == pytest.approx(models[arm]["agreement"]["mean"])


def test_text_parquet_with_test_validation_and_unlabelled_tables(tmp_path):
    data = {
        "train": {"path": _write(_texts(40, 0), tmp_path / "train.parquet", "parquet")},
        "test": {"path": _write(_texts(16, 1), tmp_path / "test.parquet", "parquet")},
        "validation": _write(_texts(8, 2), tmp_path / "val.parquet", "parquet"),
        "unlabelled": {
            "path": _write([{"text": r["text"]} for r in _texts(20, 3)], tmp_path / "u.jsonl", "jsonl")
        },
        "text_field": "text",
        "labelled": 20,
    }
    assert _run(tmp_path, data, BOW, {**BOW, "embed_dim": 16}) == 0  # same tokenizer: one batch key
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert cfg.data.transfer is None  # an unlabelled table is used by default
    splits = load_classification_data(cfg.data, 0)
    assert (len(splits.labelled), len(splits.transfer), len(splits.validation), len(splits.test)) == (
        20,
        40,
        8,
        16,
    )
    assert splits.class_names == ("neg", "pos")  # sorted distinct labels of train
    assert bool((splits.transfer.y == -100).all())
    assert splits.transfer.x.dtype == torch.long and int(splits.transfer.x.min()) == TEXT_PAD


@pytest.mark.parametrize("fmt", ["jsonl", "disk"])
def test_features_jsonl_and_saved_folder(tmp_path, fmt):
    name = "train.jsonl" if fmt == "jsonl" else "train_dir"
    train = _write(_features(60, 0), tmp_path / name, fmt)
    assert _run(tmp_path, {"train": train, "features_field": "x"}, MLP, {"name": "mlp", "hidden": [32]}) == 0
    models = _summary(tmp_path / "run")
    assert 0 <= models["distilled"]["accuracy"]["mean"] <= 100


def test_features_csv_columns_reshaped_for_a_cnn(tmp_path):
    train = _write(_features(60, 0), tmp_path / "train.csv", "csv", columns=True)
    data = {"train": train, "features_field": [f"x{j}" for j in range(16)], "input_shape": [1, 4, 4]}
    cnn = {"name": "cnn", "channels": [4, 4], "dropout": 0.0}
    assert _run(tmp_path, data, MLP, cnn) == 0
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert load_classification_data(cfg.data, 0).input_shape == (1, 4, 4)


def test_a_pretrained_sequence_classifier_teaches_with_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *FILLER, *POS, *NEG])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                     cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    bert = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, max_position_embeddings=64)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(bert)
    hf_tok.save_pretrained(bert)
    train = _write(_texts(60, 0), tmp_path / "train.jsonl", "jsonl")
    data = {"train": train, "text_field": "text", "max_length": 16}
    assert _run(tmp_path, data, BOW, {"pretrained": str(bert), "new_head": True}) == 0
    assert "teacher" in _summary(tmp_path / "run")
    # a pretrained student is saved for transformers, with its tokenizer
    assert _run(tmp_path, data, {"pretrained": str(bert)}, None, name="hf-student") == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    saved = tmp_path / "hf-student" / "seed-0" / "baseline" / "model"
    model, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(saved),
        AutoTokenizer.from_pretrained(saved),
    )
    assert model(**tokenizer(["a great film"], return_tensors="pt")).logits.shape == (1, 2)
    # without tokenizer files it is a user error naming the field
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bert / f).unlink(missing_ok=True)
    assert _run(tmp_path, data, BOW, {"pretrained": str(bert)}, name="no-tokenizer") == 2
    assert not (tmp_path / "no-tokenizer").exists()


@pytest.mark.parametrize("model", ["text_cnn", "bow_mlp"])
def test_a_text_models_output_does_not_depend_on_the_other_texts_of_its_batch(model):
    from distillery.models.text import BowMLP, TextCNN

    torch.manual_seed(0)
    net = (TextCNN(50, 3, 8, 4, [1, 3]) if model == "text_cnn" else BowMLP(50, 3, 8, [8])).eval()
    short = torch.tensor([[5, 7, TEXT_PAD, TEXT_PAD, TEXT_PAD, TEXT_PAD]])
    batch = torch.cat([short, torch.tensor([[1, 2, 3, 4, 5, 6]])])
    with torch.no_grad():
        assert torch.allclose(net(short), net(batch)[:1], atol=1e-6)
        assert torch.allclose(net(short[:, :2]), net(short), atol=1e-6)  # trailing padding changes nothing


# ---- splits and the teacher cache -------------------------------------------------------------


def test_validation_and_labelled_splits_never_touch_test_rows(tmp_path):
    train = _write(_features(90, 0), tmp_path / "train.jsonl", "jsonl")
    cfg = FilesDataConfig(train=train, features_field="x", validation=0.2, test=30, transfer=None)
    ids = lambda ds: set(ds.x[:, 0].long().tolist())  # noqa: E731 -- the unique id of each row
    tests = []
    for seed in (0, 1, 2):
        s = load_classification_data(cfg, seed)
        test, val, lab, tra = ids(s.test), ids(s.validation), ids(s.labelled), ids(s.transfer)
        assert (len(test), len(val), len(lab) + len(tra)) == (30, 12, 48)
        assert not (test & val) and not (test & lab) and not (test & tra) and not (val & (lab | tra))
        assert torch.bincount(s.validation.y).tolist() == [4, 4, 4]  # class-balanced
        tests.append(test)
    assert tests[0] == tests[1] == tests[2]  # one fixed test split (split_seed), whatever the run seed
    other = load_classification_data(cfg.model_copy(update={"split_seed": 1}), 0)
    assert ids(other.test) != tests[0]


def test_a_changed_file_never_reuses_a_teacher(tmp_path):
    from distillery.tasks.classification import teacher_cache_key

    rows = _texts(40, 0)
    path = tmp_path / "train.csv"
    _write(rows, path, "csv")
    yaml_cfg = {"data": {"name": "files", "train": str(path), "text_field": "text"}, "teacher": {"model": BOW,
                "train": STEPS}, "student": BOW, "loss": {"kd": {}}, "train": STEPS}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(yaml_cfg))
    cfg = load_config(str(tmp_path / "c.yaml"))
    key = teacher_cache_key(cfg, 0, UserData(cfg.data).fingerprint())
    copy = tmp_path / "elsewhere.csv"
    copy.write_bytes(path.read_bytes())
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": cfg.data.train.model_copy(
        update={"path": str(copy)})})})  # fmt: skip
    assert teacher_cache_key(moved, 0, UserData(moved.data).fingerprint()) == key  # contents, not paths
    rows[5]["label"] = "pos" if rows[5]["label"] == "neg" else "neg"
    _write(rows, path, "csv")
    changed = UserData(cfg.data)
    assert teacher_cache_key(cfg, 0, changed.fingerprint()) != key
    assert (
        changed.class_names[int(changed.pool.labels[changed.pool.inputs.index(rows[5]["text"])])]
        == rows[5]["label"]
    )
    builtin = load_config("digits-kd")
    assert isinstance(builtin.data, ImageDataConfig)  # built-in keys as before: no file hashes
    assert "tables_sha256" not in teacher_cache_key(builtin, 0)["data"]


# ---- bad input: exit 2, nothing written -----------------------------------------------------------


def test_bad_inputs_are_user_errors_and_leave_no_run_folder(tmp_path, capsys):
    good = _write(_texts(30, 0), tmp_path / "train.csv", "csv")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "train.xlsx").write_text("not a table")
    bad_label = _texts(30, 0)
    bad_label[2]["label"] = "maybe"
    bad = _write(bad_label, tmp_path / "bad.jsonl", "jsonl")
    cases = [
        ({"train": str(tmp_path / "missing.csv"), "text_field": "text"}, BOW, "missing.csv does not exist"),
        ({"train": str(tmp_path / "empty.csv"), "text_field": "text"}, BOW, "empty.csv is empty"),
        ({"train": str(tmp_path / "train.xlsx"), "text_field": "text"}, BOW, "cannot tell the format"),
        ({"train": good, "text_field": "review"}, BOW, "has no field 'review'; its fields are text, label"),
        ({"train": good, "text_field": "text", "label_field": "stars"}, BOW, "has no field 'stars'"),
        ({"train": bad, "text_field": "text", "labels": ["neg", "pos"]}, BOW,
         "row 3 of " + bad + " has label 'maybe' in 'label', not one of data.labels (neg, pos)"),
        ({"train": good, "test": bad, "text_field": "text"}, BOW, "data.test: row 3 of"),
        ({"train": good, "text_field": "text"}, MLP,
         "student.name=mlp takes numbers, but data.text_field='text' gives text; models that take text: bow_mlp, "
         "text_cnn, or pretrained"),
        ({"train": good, "features_field": "text"}, MLP, "row 1 of " + good + " has 'text' = "),
        ({"train": good, "text_field": "text", "features_field": "x"}, BOW, "give exactly one of data.text_field"),
    ]  # fmt: skip
    features = _write(_features(30, 0), tmp_path / "f.jsonl", "jsonl")
    cases.append(({"train": features, "features_field": "x", "input_shape": [2, 8, 2]}, MLP,
                  "data.input_shape=[2, 8, 2] holds 32 values, but each row of"))  # fmt: skip
    for i, (data, student, message) in enumerate(cases):
        assert _run(tmp_path, data, student, None, name=f"bad-{i}") == 2, message
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err
        assert not (tmp_path / f"bad-{i}").exists()  # the run folder is removed (or never made)
    augment = ["train.augment={shift: 1}"]  # flat numbers are not images
    assert _run(tmp_path, {"train": features, "features_field": "x"}, MLP, None, "bad-aug", augment) == 2
    assert "set data.input_shape (e.g. [1, 8, 8]) or remove train.augment" in capsys.readouterr().err
    assert not (tmp_path / "bad-aug").exists()


# ---- the shipped recipe -----------------------------------------------------------------------


def test_the_text_classification_recipe_runs_in_a_reduced_setting(tmp_path, monkeypatch):
    from pathlib import Path

    from distillery.recipes import list_recipes

    recipe = {r.name: r for r in list_recipes()}["text-classification-kd"]
    assert recipe.description.startswith("Text classification") and recipe.duration.startswith("About")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the recipe's paths are relative to the repo
    out = tmp_path / "recipe"
    args = [
        "seeds=[0]",
        "teacher.ensemble=1",
        "teacher.train.steps=20",
        "train.steps=20",
        "train.eval_every=10",
    ]
    assert main(["run", "text-classification-kd", *args, "--no-progress", f"output.dir={out}"]) == 0
    models = _summary(out)
    assert set(models) >= {"teacher", "baseline", "distilled"}
    cfg = load_config("text-classification-kd")
    assert cfg.student.tokenizer != cfg.teacher.model.tokenizer  # the teacher reads its own ids
    # distillery eval on another test set: the run's own test file gives the run's numbers again,
    # a part of it other numbers; built-in data cannot take a file
    import csv
    import json

    from distillery.experiment import evaluate_run

    same = evaluate_run(out, data="examples/text-classification/test.csv").summary["models"]
    assert same["distilled"]["accuracy"]["mean"] == pytest.approx(models["distilled"]["accuracy"]["mean"])
    rows = list(csv.DictReader(open("examples/text-classification/test.csv")))
    part = tmp_path / "part.csv"
    with part.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["label"] == rows[0]["label"])  # one class only
    assert main(["eval", str(out), "--data", str(part)]) == 0
    digits = tmp_path / "digits"
    assert main(["run", "digits-kd", "seeds=[0]", "teacher.train.steps=2", "teacher.ensemble=1", "train.steps=2",
                 "baseline.train.steps=2", "--no-progress", f"output.dir={digits}"]) == 0  # fmt: skip
    assert main(["eval", str(digits), "--data", str(part)]) == 2
    assert json.loads((out / "summary.json").read_text())["models"]  # the run's own files are untouched
