"""Two runs that need the same teacher at the same time: it is trained once, under the cache's lock.

Both runs are real ``distillery run`` processes (different run folders, one teacher cache). The one
that trains the teacher is held, lock in hand, just before it renames the new cache entry into place,
until the other says it is waiting; so the test does not depend on how the two happen to be scheduled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import TALLY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "seeds=[0]",
    "baseline.enabled=false",
    "teacher.ensemble=1",
    "teacher.train.steps=12",
    "train.steps=8",
    "train.eval_every=0",
    "output.tensorboard=false",
]

# argv: GATE, then the command line. Holds a teacher's cache entry before its rename until GATE exists.
WORKER = r"""
import sys, time
from pathlib import Path
from distillery import fileio
from distillery.cli import main

gate = Path(sys.argv[1])

def hold(tmp):
    if (tmp / "meta.json").is_file():  # a teacher cache entry, not a checkpoint or a single file
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

fileio.HOOKS["before_rename"].append(hold)
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_needing_one_teacher_train_it_once(tmp_path):
    cache, gate = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    procs = {}
    for name, log in logs.items():
        args = [*TINY, f"output.dir={tmp_path / name}", f"teacher.cache_dir={cache}"]
        with open(log, "w") as fh:
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(gate), "run", "--no-progress", *args],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            if any("waiting for another process" in log.read_text() for log in logs.values()):
                break
            time.sleep(0.1)
        gate.touch()
        for p in procs.values():
            p.wait(timeout=300)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    out = {name: log.read_text() for name, log in logs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out

    trainers = [name for name in out if "(trained in" in out[name]]
    assert len(trainers) == 1, out  # trained exactly once
    (trainer,) = trainers
    (waiter,) = set(out) - {trainer}
    assert f"waiting for another process (PID {procs[trainer].pid}) training this teacher" in out[waiter]
    assert "trained by another process" in out[waiter] and "(cached)" in out[waiter]

    # the same teacher on both sides: equal test metrics, and equal students distilled from it
    info = {n: json.loads((tmp_path / n / "seed-0" / "teacher.json").read_text()) for n in out}
    assert info["a"]["metrics"] == info["b"]["metrics"] and info["a"]["cache_key"] == info["b"]["cache_key"]
    students = {n: load_file(str(tmp_path / n / "seed-0" / "distilled" / "student.safetensors")) for n in out}
    assert all(torch.equal(students["a"][k], students["b"][k]) for k in students["a"])
    entries = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert entries == [info["a"]["cache_key"]]
    TALLY["races handled"] += 1
