"""fit over ordinary datasets (map-style torch, Hugging Face), adapter key checks, pretrained teachers
without their head, progress lines, and the checks of a run that depend on the number of processes."""

import io
import os
import signal

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from distillery.data import ArrayDataset
from distillery.errors import ConfigError, RunInterrupted
from distillery.losses import CrossEntropyLoss, ForwardKLLoss, Objective
from distillery.models.adapters import ClassifierAdapter
from distillery.models.hf import HFSequenceClassifierAdapter
from distillery.teachers import FrozenTeacher
from distillery.train import TrainConfig, fit
from distillery.train.config import check_processes
from distillery.train.datasets import TrainSetError, batch_source
from distillery.train.launch import launch_warning
from distillery.train.progress import TrainProgress, fit_line, progress_interval


def _xy(n=40, d=6, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))


def _teacher():
    torch.manual_seed(1)
    return FrozenTeacher(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)))


def _objective():
    return Objective({"ce": CrossEntropyLoss(), "kd": ForwardKLLoss(2.0)}, weights={"ce": 0.5, "kd": 0.5})


def _cfg(**kw):
    return TrainConfig(**{"steps": 10, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}, **kw})


def _fit(train_set, **kw):
    return fit(_model(), train_set, _objective(), kw.pop("cfg", _cfg()), teacher=_teacher(), seed=3,
               progress=False, **kw)  # fmt: skip


def _same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


class DictItems(Dataset):
    """A map-style dataset whose items are dicts of a tensor and a plain int."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(self.y[i])}


@pytest.fixture(scope="module")
def reference():
    x, y = _xy()
    return _fit(ArrayDataset(x, y, torch.arange(len(y))))


def test_map_style_datasets_train_exactly_like_get_batch(reference):
    x, y = _xy()
    _same(reference.model, _fit(DictItems(x, y)).model)
    _same(reference.model, _fit(TensorDataset(x, y)).model)  # (x, y) pairs -> keys x, y
    _same(reference.model, _fit([(x[i], y[i]) for i in range(len(y))]).model)  # a plain list of pairs


def test_a_hugging_face_dataset_trains_exactly_like_get_batch(reference):
    datasets = pytest.importorskip("datasets")
    x, y = _xy()
    ds = datasets.Dataset.from_dict(
        {"x": x.tolist(), "y": y.tolist(), "text": [f"t{i}" for i in range(len(y))]}
    )
    got = _fit(ds)
    # float32 columns round-trip exactly through Arrow
    _same(reference.model, got.model)
    batch = batch_source(ds).get_batch(torch.tensor([3, 1]))
    assert batch["text"] == ["t3", "t1"] and batch["index"].tolist() == [3, 1]
    assert batch["x"].dtype == torch.float32 and batch["y"].tolist() == y[[3, 1]].tolist()


def test_collate_fn_builds_the_batches(reference):
    x, y = _xy()
    seen = []

    def collate(items):
        seen.append(len(items))
        return {"x": torch.stack([i["x"] for i in items]), "y": torch.tensor([i["y"] for i in items])}

    _same(reference.model, _fit(DictItems(x, y), collate_fn=collate).model)
    assert set(seen) == {8}


def test_hugging_face_rows_go_to_collate_fn_as_dicts():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"ids": [[1, 2], [3], [4, 5, 6]], "labels": [0, 1, 0]})
    with pytest.raises(TrainSetError, match="different lengths.*collate_fn"):
        batch_source(ds).get_batch(torch.tensor([0, 2]))

    def pad(rows):
        longest = max(len(r["ids"]) for r in rows)
        return {
            "input_ids": torch.tensor([r["ids"] + [0] * (longest - len(r["ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    batch = batch_source(ds, pad).get_batch(torch.tensor([2, 1]))
    assert batch["input_ids"].tolist() == [[4, 5, 6], [3, 0, 0]] and batch["index"].tolist() == [2, 1]


def test_resume_is_exact_with_a_map_style_dataset(tmp_path):
    x, y = _xy()
    data = DictItems(x, y)
    cfg = _cfg(steps=12)
    full = _fit(data, cfg=cfg)

    def press_ctrl_c(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        _fit(data, cfg=cfg, run_dir=tmp_path, on_step=press_ctrl_c)
    resumed = _fit(data, cfg=cfg, run_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 5
    _same(full.model, resumed.model)


class NoProtocol:
    def __len__(self):
        return 3


class Stream(IterableDataset):
    def __iter__(self):
        yield {"x": torch.zeros(6), "y": 0}


@pytest.mark.parametrize(
    ("train_set", "says"),
    [
        (NoProtocol(), "it has no get_batch, and no __getitem__"),
        (object(), "no __len__ and __getitem__"),
        (Stream(), "iterable dataset"),
        ({"x": torch.zeros(3, 6), "y": torch.zeros(3)}, "TensorDataset"),
    ],
)
def test_a_training_set_of_no_protocol_is_one_error_naming_them(train_set, says):
    with pytest.raises(TrainSetError) as info:
        _fit(train_set)
    message = str(info.value)
    assert says in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TypeError)
    if says != "TensorDataset":
        assert all(p in message for p in ("get_batch", "__getitem__", "datasets.Dataset"))


def test_collate_fn_with_a_get_batch_dataset_is_refused():
    x, y = _xy()
    with pytest.raises(TrainSetError, match="builds its own batches"):
        _fit(ArrayDataset(x, y, torch.arange(len(y))), collate_fn=lambda items: items)


def test_items_that_are_not_dicts_or_pairs_are_named():
    x, _ = _xy()
    with pytest.raises(TrainSetError, match="dict of tensors .* or an \\(x, y\\) pair"):
        _fit([(x[i], 0, 1) for i in range(len(x))])


# ---- adapters: the batch keys are checked at the first batch ------------------------------------


def _tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, num_labels=3, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def _token_rows(n=8):
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1, 30, (5,), generator=g), "attention_mask": torch.ones(5, dtype=torch.long),
         "labels": int(i % 3)}
        for i in range(n)
    ]  # fmt: skip


def test_a_hugging_face_model_with_the_default_adapter_names_the_adapter_to_use():
    pytest.importorskip("transformers")
    obj = Objective({"ce": CrossEntropyLoss()})
    cfg = TrainConfig(steps=2, batch_size=4)
    with pytest.raises(ConfigError) as info:
        fit(_tiny_bert_classifier(), _token_rows(), obj, cfg, progress=False)
    message = str(info.value)
    assert "ClassifierAdapter reads x, y (missing: x, y)" in message
    assert "adapter=HFSequenceClassifierAdapter()" in message and "BertForSequenceClassification" in message
    done = fit(_tiny_bert_classifier(), _token_rows(), obj, cfg, adapter=HFSequenceClassifierAdapter(),
               progress=False)  # fmt: skip
    assert done.steps == 2


def test_the_teachers_adapter_is_checked_too():
    pytest.importorskip("transformers")
    x, y = _xy()
    teacher = FrozenTeacher(_tiny_bert_classifier(), HFSequenceClassifierAdapter())
    with pytest.raises(ConfigError) as info:
        fit(_model(), TensorDataset(x, y), _objective(), _cfg(), teacher=teacher, progress=False)
    message = str(info.value)
    assert "the teacher's adapter HFSequenceClassifierAdapter reads input_ids, labels" in message
    assert "needs tokenized batches" in message


def test_classifier_adapter_refuses_a_model_output_object():
    pytest.importorskip("transformers")
    batch = {"x": torch.randint(1, 30, (2, 5)), "y": torch.tensor([0, 1])}
    with pytest.raises(TypeError, match="returned a SequenceClassifierOutput.*HFSequenceClassifierAdapter"):
        ClassifierAdapter().forward(_tiny_bert_classifier(), batch)


# ---- FrozenTeacher.from_pretrained refuses a checkpoint without its head --------------------------


def test_from_pretrained_refuses_a_checkpoint_without_the_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ConfigError) as info:
        FrozenTeacher.from_pretrained(str(tmp_path / "encoder"), task="sequence-classification")
    message = str(info.value)
    assert "classifier.weight" in message and "at random" in message
    assert "BertModel: a base model without a task head, loaded by AutoModel" in message
    _tiny_bert_classifier().save_pretrained(tmp_path / "classifier")
    teacher = FrozenTeacher.from_pretrained(str(tmp_path / "classifier"))
    assert isinstance(teacher.adapter, HFSequenceClassifierAdapter)
    with pytest.raises(ConfigError, match="no model config found"):
        FrozenTeacher.from_pretrained(str(tmp_path / "missing"))


# ---- progress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [20, 30, 40, 60, 80, 120, 200])
def test_the_eta_and_the_step_are_never_cut(width):
    pieces = fit_line("seed 0 distilled", "120/500", "ETA 0:00:31", "loss 0.8123 ce 0.5100 kd 0.3000",
                      "1,234 samples/s", (120, 500), width)  # fmt: skip
    text = "".join(t for t, _ in pieces)
    assert len(text) <= max(width, len("120/500 ETA 0:00:31"))
    assert "120/500" in text and text.endswith("ETA 0:00:31")
    if width >= 120:
        assert "kd 0.3000" in text and "samples/s" in text


@pytest.mark.parametrize("width", [30, 50, 100])
def test_the_live_line_fits_a_narrow_terminal(width):
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None)
    bar = TrainProgress("seed 0 distilled", 500, enabled=True, console=console)
    bar.update(120, 64, {"loss": 0.81, "ce": 0.51, "kd": 0.3})
    bar.progress.refresh()
    bar.close()
    lines = [line for line in buf.getvalue().replace("\r", "\n").split("\n") if "120/500" in line]
    assert lines and all("ETA" in line for line in lines)


def test_plain_lines_when_the_output_is_not_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, width=60)  # not a terminal: a pipe or a log
    bar = TrainProgress("seed 0 baseline", 4, enabled=True, console=console, every_s=0)
    for step in range(1, 5):
        bar.update(step, 8, {"loss": 1.0 / step})
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("seed 0 baseline: step 4/4 (100%) | loss 0.2500")
    assert all("samples/s" in line and "ETA " in line for line in lines)
    quiet = io.StringIO()
    slow = TrainProgress("x", 4, console=Console(file=quiet), every_s=3600)
    slow.update(1, 8, {"loss": 1.0})
    assert quiet.getvalue() == ""


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISTILLERY_PROGRESS_EVERY", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.delenv("DISTILLERY_PROGRESS_EVERY")
    assert progress_interval() == 30.0
    with pytest.raises(ConfigError, match="DISTILLERY_PROGRESS_EVERY='soon'"):
        progress_interval("soon")


def test_a_resumed_fit_says_from_which_step(tmp_path, capsys):
    x, y = _xy()
    data = ArrayDataset(x, y, torch.arange(len(y)))
    _fit(data, cfg=_cfg(steps=4), run_dir=tmp_path, label="arm")
    _fit(data, cfg=_cfg(steps=6), run_dir=tmp_path, label="arm", resume=True)
    assert "arm: resumed from step 4 of 6 (step-00000004)" in capsys.readouterr().out


# ---- processes -----------------------------------------------------------------------------------


def test_batch_split_is_checked_for_every_trained_model():
    from distillery.config import load_config

    cfg = load_config(
        "digits-kd", ["train.batch_size=12", "train.grad_accum=4", "baseline.train.grad_accum=2"]
    )
    check_processes(cfg, 1)
    with pytest.raises(
        ConfigError, match=r"^train.batch_size=12 must be divisible by train.grad_accum=4 x 2"
    ):
        check_processes(cfg, 2)
    cfg = load_config("digits-kd", ["teacher.train.batch_size=7"])
    with pytest.raises(ConfigError, match=r"^teacher.train.batch_size=7 .* e.g. teacher.train.batch_size=8"):
        check_processes(cfg, 2)


class TwoProcesses:
    """An accelerator that says two processes: start_run must refuse a bad split before anything else."""

    num_processes = 2
    is_main_process = True

    def __getattr__(self, name):
        raise AssertionError(f"start_run used accelerator.{name} before checking the config")


def test_start_run_refuses_a_bad_split_before_creating_anything(tmp_path):
    from distillery.config import load_config
    from distillery.experiment.rundir import start_run

    cfg = load_config("digits-kd", ["train.batch_size=12", "train.grad_accum=4", f"output.root={tmp_path}"])
    with pytest.raises(ConfigError, match="train.batch_size=12 must be divisible"):
        start_run(cfg, False, None, False, TwoProcesses())
    assert not any(tmp_path.iterdir())


def test_launch_warning_reads_the_simple_launcher_signal():
    launched = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    message = launch_warning(1, {**launched, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "accelerate launch --multi_gpu --num_processes 2" in message
    assert launch_warning(1, launched) is None  # --num_processes 1
    assert launch_warning(1, {**launched, "MASTER_ADDR": "x", "WORLD_SIZE": "1"}) is None  # torchrun
    assert launch_warning(2, {**launched, "MASTER_ADDR": "x", "WORLD_SIZE": "2"}) is None
    assert launch_warning(1, {"MASTER_ADDR": "x"}) is None  # not launched by accelerate
