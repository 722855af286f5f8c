"""Run folders: two runs started together never share one, a folder in use is refused with its
owner, a failed start leaves nothing behind, and ``--resume`` finds the run of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from distillery.cli import main
from distillery.config import load_config
from distillery.experiment import rundir
from tests.faults.conftest import TALLY

ROOT = Path(__file__).resolve().parents[2]
# A few seconds per run: one seed, a 10-step teacher, 12-step arms.
TINY = [
    "digits-kd", "seeds=[0]", "teacher.train.steps=10", "teacher.ensemble=1", "train.steps=12",
    "baseline.train.steps=12", "train.eval_every=6", "train.log_every=1", "output.tensorboard=false",
    "--no-progress",
]  # fmt: skip


def _cli(args: list[str]) -> subprocess.Popen:
    """A run in its own process, sharing this test's teacher cache (``DISTILLERY_CACHE``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "distillery", "run", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.integration
def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Same name and root, different temperatures, started at once: two folders, each consistent."""
    root = tmp_path / "runs"
    main(["run", *TINY, f"output.root={tmp_path / 'warm'}"])  # train the teacher once, beforehand
    procs = {t: _cli([*TINY, f"output.root={root}", f"loss.forward_kl.temperature={t}"]) for t in (1, 8)}
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted((root / "digits-kd").iterdir())
    assert len(folders) == 2
    temperatures = set()
    for folder in folders:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        temperatures.add(cfg["loss"]["forward_kl"]["temperature"])
        assert not (folder / ".lock").exists()  # released at the end
        for log in folder.glob("seed-0/*/metrics.jsonl"):  # one history per arm, not two mixed
            steps = [
                r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"
            ]
            assert steps == list(range(1, 13)), log
    assert temperatures == {1.0, 8.0}
    TALLY["races handled"] += 1


def test_same_second_gets_a_suffix_not_the_same_folder(tmp_path, monkeypatch):
    """The folder is created exclusively: a second run in the same second takes ``<stamp>-2``."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    cfg = load_config("digits-kd", [f"output.root={tmp_path}"])
    first, second = rundir.create_run_dir(cfg), rundir.create_run_dir(cfg)
    assert first.name == "20261201-120000" and second.name == "20261201-120000-2"
    assert first.is_dir() and second.is_dir()
    TALLY["races handled"] += 1


def test_resume_of_a_folder_in_use_is_refused_with_the_owner(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, f"output.dir={run_dir}"]) == 0
    lock = rundir.RunLock(run_dir)
    lock.acquire()  # a live owner: this process
    try:
        capsys.readouterr()
        assert main(["run", *TINY, f"output.dir={run_dir}", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {os.getpid()}" in err and str(run_dir) in err
    finally:
        lock.release()
    TALLY["races handled"] += 1


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, f"output.dir={run_dir}"]) == 0
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": time.time()}))
    assert main(["run", *TINY, f"output.dir={run_dir}", "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_failed_start_leaves_no_folder_and_resume_finds_the_run_of_this_config(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["run", *TINY, f"output.root={root}"]) == 0
    good = sorted((root / "digits-kd").iterdir())
    assert len(good) == 1
    # fails during setup (more labelled examples than the data holds): nothing is left behind
    assert main(["run", *TINY, f"output.root={root}", "data.labelled=5000"]) == 2
    assert sorted((root / "digits-kd").iterdir()) == good
    # a finished run of another config, newer by name: --resume still finds the one of this config
    time.sleep(1.1)
    assert main(["run", *TINY, f"output.root={root}", "train.steps=10"]) == 0
    capsys.readouterr()
    assert main(["run", *TINY, f"output.root={root}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {good[0]}" in out and "output.dir=" in out
    # no run of this config at all: the message names the newest and how to pick a folder
    assert main(["run", *TINY, f"output.root={root}", "train.steps=11", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 run(s)" in err and "output.dir=<folder>" in err and "train.steps" in err
