"""Experiment trackers through Accelerate (``output.report_to``): MLflow's local store read back."""

from __future__ import annotations

import importlib.util

import pytest

from distillery.cli import main

TINY = [
    "run", "digits-kd", "seeds=[0]", "teacher.train.steps=10", "teacher.ensemble=1", "train.steps=12",
    "baseline.train.steps=12", "train.log_every=4", "train.eval_every=6", "--no-progress",
]  # fmt: skip


@pytest.mark.integration
def test_mlflow_offline_store_gets_the_config_and_every_record(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is a dev dependency (make test installs it)")
    import mlflow

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main([*TINY, "output.report_to=[mlflow]", f"output.root={tmp_path / 'runs'}"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits-kd").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "12" and params["loss.forward_kl.temperature"] == "2.0"
    history = client.get_metric_history(run.info.run_id, "seed-0/distilled/train/loss")
    assert [m.step for m in history] == [4, 8, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seed-0/baseline/eval/accuracy")] == [
        6,
        12,
    ]
    (test_acc,) = client.get_metric_history(run.info.run_id, "seed-0/distilled/test/accuracy")
    assert 0 <= test_acc.value <= 100


def test_unknown_or_missing_tracker_is_a_user_error(tmp_path, capsys, monkeypatch):
    assert main([*TINY, "output.report_to=[neptune]", f"output.root={tmp_path}"]) == 2
    assert "unknown tracker 'neptune'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert main([*TINY, "output.report_to=[wandb]", f"output.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "needs the package wandb, which is not installed" in err
    assert not any(tmp_path.iterdir())  # refused at validation: nothing written


@pytest.mark.integration
def test_a_tracker_that_cannot_start_is_a_user_error_leaving_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is a dev dependency (make test installs it)")
    from accelerate.tracking import MLflowTracker

    def refuse(self):  # what a wrong MLFLOW_TRACKING_URI or a server that is down looks like
        raise RuntimeError("cannot reach the tracking server")

    monkeypatch.setattr(MLflowTracker, "start", refuse)
    code = main([*TINY, "output.report_to=[mlflow]", f"output.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "the mlflow tracker could not start" in err and "MLFLOW_TRACKING_URI" in err
    assert "cannot reach the tracking server" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))
