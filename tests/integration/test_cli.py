"""The command line end to end: help, user errors, the main job in a reduced setting, eval, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "seeds=[0,1]",
    "train.steps=120",
    "train.eval_every=40",
    "teacher.train.steps=40",
    "teacher.ensemble=1",
    "baseline.train.steps=120",
]


def cli(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distillery", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", [[], ["run"], ["recipes"], ["eval"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: distillery" in out
    if command == ["run"]:
        assert "--resume" in out and "KEY=VALUE" in out and "train.steps=100" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bad_override_is_a_short_error_with_exit_code_2():
    proc = cli("run", "train.steps=ten")
    assert proc.returncode == 2
    assert "train.steps: expected an integer, got 'ten'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    debug = cli("--debug", "run", "train.steps=ten")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_missing_config_file_and_unknown_recipe(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no recipe or config file named 'no-such-recipe'" in err and "digits-kd" in err
    assert main(["run", "train.steps=5", "not-an-override"]) == 2
    assert "not of the form key=value" in capsys.readouterr().err


def test_recipes_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits-kd (default)" in out and "fashion-mnist-kd" in out


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["run", "--dry-run", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "name: digits-kd" in out and "forward_kl" in out


def test_eval_of_a_missing_directory(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_main_job_reduced_end_to_end_then_eval_and_resume(tmp_path):
    env = {"DISTILLERY_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    proc = cli("run", *QUICK, f"output.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for text in (
        "teacher",
        "student CE",
        "student KD",
        "accuracy",
        "ECE",
        "agreement",
        "params",
        "time",
        "paired accuracy difference",
    ):
        assert text in out, text
    for name in ("config.yaml", "summary.json", "report.md", "learning_curves.png"):
        assert (run_dir / name).is_file(), name
    for seed in (0, 1):
        assert (run_dir / f"seed-{seed}" / "teacher.json").is_file()
        for arm in ("baseline", "distilled"):
            arm_dir = run_dir / f"seed-{seed}" / arm
            for name in ("student.safetensors", "result.json", "metrics.jsonl"):
                assert (arm_dir / name).is_file(), (arm_dir, name)
            assert list((arm_dir / "checkpoints").glob("step-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    paired = summary["paired_distilled_minus_baseline"]["accuracy"]
    assert paired["n"] == 2 and set(summary["models"]) == {"teacher", "baseline", "distilled"}
    report = (run_dir / "report.md").read_text()
    assert "learning_curves.png" in report and "student KD" in report

    # eval reloads the saved students and reproduces the numbers
    from distillery.experiment import evaluate_run

    again = evaluate_run(run_dir)
    for arm in ("baseline", "distilled"):
        assert again.summary["models"][arm]["accuracy"]["mean"] == pytest.approx(
            summary["models"][arm]["accuracy"]["mean"], abs=1e-9
        )
    assert cli("eval", str(run_dir / "seed-0" / "distilled"), env=env).returncode == 0

    # --resume on a finished run skips every arm; a different config is refused
    proc = cli("run", *QUICK, f"output.dir={run_dir}", "--resume", env=env)
    assert proc.returncode == 0 and proc.stdout.count("already complete") == 4
    proc = cli("run", *QUICK, "train.steps=99", f"output.dir={run_dir}", "--resume", env=env)
    assert proc.returncode == 2 and "config differs" in proc.stderr and "train.steps" in proc.stderr
    # the same directory without --resume is refused rather than overwritten
    proc = cli("run", *QUICK, f"output.dir={run_dir}", env=env)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr

    # a second run reuses the cached teachers
    proc = cli("run", *QUICK, f"output.dir={tmp_path / 'run2'}", env=env)
    assert proc.returncode == 0 and proc.stdout.count("(cached)") == 2


def test_run_flags_may_come_after_overrides(capsys):
    assert main(["run", "digits-kd", "train.steps=3", "--dry-run", "seeds=[4]"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "- 4" in out


def test_losses_lists_every_term_with_its_parameters(capsys):
    from distillery.losses import LOSSES

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES:
        assert f"│ {name} " in out, name
    assert "temperature = 4.0" in out and "every term also takes: weight" in out
    assert main(["losses", "dkd"]) == 0
    one = capsys.readouterr().out
    assert "beta = 8.0" in one and "weight = 1.0" in one and "forward_kl" not in one
    assert main(["losses", "nope"]) == 2
    assert "unknown loss term 'nope'; valid: ce, forward_kl" in capsys.readouterr().err
