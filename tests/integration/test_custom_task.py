"""A task defined here, in a few lines, runs through the experiment runner end to end: run folder,
teacher trained once per seed and cached, paired baseline, summary, report, resume and eval. Adding a
task needs one class and one row in the task table, and no change to the runner."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from torch import nn

import distillery.functional as DF
from distillery.config import load_config, validate_config
from distillery.data import ArrayDataset
from distillery.experiment import evaluate_run, run
from distillery.losses import HintLoss, LossInputs, LossTerm, Objective
from distillery.models.adapters import ClassifierAdapter, ModelOutput
from distillery.tasks import BASELINE, TASKS, ArmJob, BaseTask, Metric, RunConfigBase, TeacherSpec
from distillery.teachers import FrozenTeacher


class RegressionAdapter(ClassifierAdapter):
    """One output per row, also exposed as the feature ``out`` for the MSE term."""

    def forward(self, model, batch):
        out = model(batch["x"])  # (B, 1)
        return ModelOutput(logits=out, features={"out": out})


class MSEToLabels(LossTerm):
    needs_teacher = False

    def forward(self, inputs: LossInputs, num_valid=None):
        target = inputs.target.unsqueeze(-1).to(inputs.student_logits.dtype)  # (B, 1)
        return DF.hint_loss(inputs.student_logits, target, mask=inputs.mask, num_valid=num_valid)


class ToyConfig(RunConfigBase):
    task: Literal["toy"] = "toy"
    features: int = 5


class ToyTask(BaseTask):
    """Regression on random data; the teacher is least squares, the distilled student matches its outputs."""

    config = ToyConfig
    metrics = (Metric("mse", "test MSE", 4, higher_is_better=False),)
    adapter = RegressionAdapter()

    def prepare(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(256, self.cfg.features, generator=g)
        y = x @ torch.randn(self.cfg.features, generator=g) + 0.3 * torch.randn(256, generator=g)
        sets = {name: ArrayDataset(x[s], y[s], torch.arange(len(y))[s]) for name, s in
                (("train", slice(0, 192)), ("test", slice(192, None)))}  # fmt: skip
        return {"seed": seed, **sets}

    def teacher(self, data):
        def train():
            linear = nn.Linear(self.cfg.features, 1)
            x = torch.cat([data["train"].x, torch.ones(len(data["train"]), 1)], 1)
            solution = torch.linalg.lstsq(x, data["train"].y.unsqueeze(1)).solution  # (F + 1, 1)
            linear.weight.data, linear.bias.data = solution[:-1].T.clone(), solution[-1].clone()
            return linear

        key = {"kind": "toy-teacher", "features": self.cfg.features, "seed": data["seed"]}
        return TeacherSpec(build=lambda: nn.Linear(self.cfg.features, 1), train=train, cache_key=key)

    def new_student(self, data):
        return nn.Sequential(nn.Linear(self.cfg.features, 16), nn.Tanh(), nn.Linear(16, 1))

    def arm(self, name, data, teacher, init_state, trained):
        model = self.new_student(data)
        model.load_state_dict(init_state)
        if name == BASELINE:
            objective, arm_teacher = Objective({"mse": MSEToLabels()}), None
        else:
            objective, arm_teacher = Objective({"kd": HintLoss("out")}), FrozenTeacher(teacher, self.adapter)
        evaluate = lambda m: self.evaluate(m, data, "test", None)  # noqa: E731
        return ArmJob(model, data["train"], objective, self.cfg.train, arm_teacher, self.adapter, evaluate)

    def evaluate(self, model, data, split, teacher):
        with torch.no_grad():
            pred = model(data[split].x).squeeze(-1)
        return {"mse": float((pred - data[split].y).square().mean())}


TOY = {
    "task": "toy",
    "name": "toy",
    "seeds": [0, 1],
    "train": {"steps": 60, "batch_size": 32, "optimizer": {"lr": 0.01}, "eval_every": 20},
    "baseline": {"enabled": True},
}


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", ToyTask)  # the one row a new task adds


@pytest.mark.integration
def test_a_task_defined_in_a_test_runs_through_the_experiment_runner(toy_task, tmp_path, capsys):
    cfg = validate_config({**TOY, "output": {"dir": str(tmp_path / "run")}})
    result = run(cfg, progress=False)
    run_dir = tmp_path / "run"
    assert list(result.arms) == ["baseline", "distilled"] and set(result.teachers) == {0, 1}
    for name in ("config.yaml", "summary.json", "report.md", "learning_curves.png"):
        assert (run_dir / name).is_file(), name
    for seed in (0, 1):
        assert json.loads((run_dir / f"seed-{seed}" / "teacher.json").read_text())["cached"] is False
        for arm in ("baseline", "distilled"):
            record = json.loads((run_dir / f"seed-{seed}" / arm / "result.json").read_text())
            assert record["steps"] == 60 and [h["step"] for h in record["history"]] == [20, 40, 60]
            assert (run_dir / f"seed-{seed}" / arm / "student.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "toy" and summary["paired_arm"] == "distilled"
    paired = summary["paired_distilled_minus_baseline"]["mse"]
    per_seed = {s: result.arms["distilled"][s]["metrics"]["mse"] - result.arms["baseline"][s]["metrics"]["mse"]
                for s in (0, 1)}  # fmt: skip
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    assert paired["better"] == sum(d < 0 for d in per_seed.values())  # lower MSE is better
    assert "| model | test MSE | params | time |" in (run_dir / "report.md").read_text()
    assert "paired test MSE difference" in capsys.readouterr().out

    # the same config again: the cached teachers are reused; `eval` reproduces the students' numbers
    again = run(validate_config({**TOY, "output": {"dir": str(tmp_path / "run2")}}), progress=False)
    assert all(info["cached"] for info in again.teachers.values())
    assert again.arms["distilled"][0]["metrics"] == result.arms["distilled"][0]["metrics"]
    reevaluated = evaluate_run(run_dir)
    for arm in ("baseline", "distilled"):
        for seed in (0, 1):
            assert reevaluated.arms[arm][seed]["metrics"]["mse"] == pytest.approx(
                result.arms[arm][seed]["metrics"]["mse"], rel=1e-6
            )
    # resume of a finished run trains nothing
    resumed = run(cfg, resume=True, progress=False)
    assert resumed.summary["models"]["distilled"]["mse"] == summary["models"]["distilled"]["mse"]


def test_the_toy_config_is_validated_like_any_other(toy_task):
    from distillery.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'featurez'; valid keys at the top level"):
        validate_config({**TOY, "featurez": 3})
    with pytest.raises(
        ConfigError, match="unknown key 'loss' for task: toy; `loss` belongs to task: classification"
    ):
        validate_config({**TOY, "loss": {"ce": {}}})
    assert load_config("digits-kd").task == "classification"  # the shipped tasks are untouched
