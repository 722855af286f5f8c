"""Evaluation during training sees only the validation split carved from the training data; the test
split is evaluated once per model, after training."""

from __future__ import annotations

import pytest

import distillery.experiment.runner as runner
from distillery.config import load_config
from distillery.experiment import run


@pytest.fixture
def in_training(monkeypatch):
    """``state["fit"]`` is True while the runner trains an arm."""
    state = {"fit": False}
    real_fit = runner.fit

    def fit(*args, **kwargs):
        state["fit"] = True
        try:
            return real_fit(*args, **kwargs)
        finally:
            state["fit"] = False

    monkeypatch.setattr(runner, "fit", fit)
    return state


@pytest.mark.integration
def test_classification_evaluates_on_validation_during_training(tmp_path, monkeypatch, in_training):
    import distillery.tasks.classification as task_module

    splits, seen = {}, []
    real_load, real_predict = task_module.load_classification_data, task_module.predict_logits

    def load(cfg, seed):
        splits[seed] = real_load(cfg, seed)
        return splits[seed]

    def predict(model, dataset, *args, **kwargs):
        seen.append((in_training["fit"], dataset))
        return real_predict(model, dataset, *args, **kwargs)

    monkeypatch.setattr(task_module, "load_classification_data", load)
    monkeypatch.setattr(task_module, "predict_logits", predict)
    cfg = load_config(
        "digits-kd",
        ["seeds=[0]", "teacher.train.steps=20", "teacher.ensemble=1", "train.steps=30", "train.eval_every=10",
         f"output.dir={tmp_path}"],
    )  # fmt: skip
    result = run(cfg, progress=False)
    data = splits[0]
    during = [ds for training, ds in seen if training]
    assert during and all(
        ds is data.validation for ds in during
    )  # students and the teacher's agreement logits
    assert not any(ds is data.test for training, ds in seen if training)
    assert sum(ds is data.test for training, ds in seen if not training) == 4  # teacher x2, two students
    val_ids = set(data.validation.index.tolist())
    assert len(val_ids) == 130 and data.validation.y.bincount().tolist() == [13] * 10
    assert val_ids.isdisjoint(data.labelled.index.tolist()) and val_ids.isdisjoint(
        data.transfer.index.tolist()
    )
    for arm in ("baseline", "distilled"):
        record = result.arms[arm][0]
        assert [h["step"] for h in record["history"]] == [10, 20, 30]  # validation curve
        assert record["metrics"] != {
            k: v for k, v in record["history"][-1].items() if k not in ("step", "epoch")
        }


@pytest.mark.integration
def test_no_validation_split_means_no_evaluation_during_training(tmp_path, in_training):
    cfg = load_config(
        "digits-kd",
        ["seeds=[0]", "teacher.train.steps=20", "teacher.ensemble=1", "train.steps=20", "data.validation=0",
         "data.transfer=1100", f"output.dir={tmp_path}"],
    )  # fmt: skip
    result = run(cfg, progress=False)
    assert (
        result.arms["distilled"][0]["history"] == []
        and 0 <= result.arms["distilled"][0]["metrics"]["accuracy"]
    )
    assert not (tmp_path / "learning_curves.png").exists()


@pytest.mark.integration
def test_lm_evaluates_on_validation_during_training(tmp_path, monkeypatch, in_training):
    import distillery.tasks.lm as task_module

    seen, prepared = [], {}
    real_metrics, real_prepare = task_module.lm_metrics, task_module.prepare_data

    def prepare(cfg):
        prepared.update(real_prepare(cfg))
        return prepared

    def metrics(model, dataset, *args, **kwargs):
        seen.append((in_training["fit"], dataset))
        return real_metrics(model, dataset, *args, **kwargs)

    monkeypatch.setattr(task_module, "prepare_data", prepare)
    monkeypatch.setattr(task_module, "lm_metrics", metrics)
    cfg = load_config(
        "lm-kd",
        ["teacher.train.steps=4", "train.steps=4", "train.eval_every=2", "data.name=arithmetic", "data.seq_len=16",
         "data.arithmetic.train=120", "data.arithmetic.validation=20", "data.arithmetic.test=12",
         "data.tokenizer={kind: byte}", f"output.dir={tmp_path}"],
    )  # fmt: skip
    run(cfg, progress=False)
    during = [ds for training, ds in seen if training]
    assert during and all(ds is prepared["validation"] for ds in during)
    assert sum(ds is prepared["test"] for training, ds in seen if not training) == 3  # teacher, two students
    problems = prepared["problems"]
    assert len(problems["validation"]) == 20 and len(prepared["train_pairs"]) == 100
    prompts = {p.prompt for p in problems["validation"]}
    assert prompts.isdisjoint(p.prompt for p in prepared["train_pairs"])
    assert prompts.isdisjoint(p.prompt for p in problems["test"])
