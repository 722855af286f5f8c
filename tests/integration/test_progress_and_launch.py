"""The command line through a pipe (progress lines for logs), the launch record of a run, and launches
that go wrong: a batch that does not split over the processes, two processes asked for but one started."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["seeds=[0]", "teacher.train.steps=6", "teacher.ensemble=1", "train.steps=6", "baseline.train.steps=6",
        "train.eval_every=0", "train.log_every=2"]  # fmt: skip


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "DISTILLERY_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **extra,
    }


def _run(cmd: list[str], tmp_path: Path, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _launch(args: list[str], tmp_path: Path, multi: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` asked for two CPU processes (with ``--multi_gpu``: two are started)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if multi else []),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *(["--main_process_port", "0"] if multi else []), "-m", "distillery", *args]  # fmt: skip
    return _run(cmd, tmp_path)


@pytest.mark.integration
def test_a_piped_run_prints_plain_progress_lines_and_records_its_launch(tmp_path):
    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "distillery", "run", "digits-kd", *TINY, f"output.dir={out}"], tmp_path,
                DISTILLERY_PROGRESS_EVERY="0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "processes: 1 (backend none), device cpu" in lines
    progress = [line for line in lines if re.match(r"^seed 0 \w[\w /]*: step \d+/6 \(\d+%\)", line)]
    for arm in ("teacher 1/1", "baseline", "distilled"):
        mine = [line for line in progress if line.startswith(f"seed 0 {arm}: ")]
        assert [re.search(r"step (\d+)/6", line).group(1) for line in mine] == [
            str(s) for s in range(1, 7)
        ], arm
        assert all(re.search(r"\| ETA \d+:\d\d:\d\d$", line) and "samples/s" in line for line in mine)
        assert all("| loss " in line for line in mine)
    assert "\x1b[" not in proc.stdout  # no terminal control codes in a log
    record = json.loads((out / "run.json").read_text())
    assert record["processes"] == 1 and record["backend"] == "none" and record["device"] == "cpu"
    assert record["resumed"] is False and record["earlier"] == []

    again = _run([sys.executable, "-m", "distillery", "run", "digits-kd", *TINY, f"output.dir={out}", "--resume"],
                 tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["resumed"] is True and [r["resumed"] for r in record["earlier"]] == [False]


@pytest.mark.integration
def test_a_batch_that_does_not_split_over_two_processes_fails_before_any_training(tmp_path):
    proc = _launch(["run", "digits-kd", *TINY, "train.batch_size=12", "train.grad_accum=4",
                    f"output.root={tmp_path / 'runs'}"], tmp_path)  # fmt: skip
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert (
        text.count("error: train.batch_size=12 must be divisible by train.grad_accum=4 x 2 processes") == 1
    ), text
    assert "teacher" not in proc.stdout  # nothing trained
    assert not (tmp_path / "runs").exists()
    cache = tmp_path / "cache" / "teachers"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


@pytest.mark.integration
def test_two_processes_asked_for_without_multi_gpu_gets_a_warning(tmp_path):
    # --resume of an empty folder stops right after the start of the run: no training needed
    proc = _launch(["run", "digits-kd", f"output.dir={tmp_path / 'none'}", "--resume"], tmp_path, multi=False)
    assert "processes: 1 (backend none)" in proc.stdout, proc.stdout + proc.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stdout
    assert "holds no run" in proc.stderr
