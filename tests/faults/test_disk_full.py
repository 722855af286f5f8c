"""A full disk and a torn metric log: the run stops with a message naming the file, nothing
half-written is taken for complete, and ``--resume`` (once there is space) ends bit-identical to a
run that never hit the wall."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery import fileio
from distillery.cli import main
from distillery.fileio import verify_manifest
from distillery.train.checkpoint import checkpoint_dirs
from tests.faults.conftest import TALLY

TINY = [
    "digits-kd", "seeds=[0]", "teacher.train.steps=10", "teacher.ensemble=1", "train.steps=20",
    "baseline.train.steps=20", "train.eval_every=10", "train.log_every=1", "train.checkpoint_every=5",
    "output.tensorboard=false", "--no-progress",
]  # fmt: skip


def _students(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.parent.name: {k: v.clone() for k, v in load_file(str(p)).items()}
        for p in sorted(run_dir.glob("seed-0/*/student.safetensors"))
    }


def _assert_same(a, b) -> None:
    assert a.keys() == b.keys() == {"baseline", "distilled"}
    for arm in a:
        assert all(torch.equal(a[arm][k], b[arm][k]) for k in a[arm]), arm


@pytest.fixture
def reference(tmp_path):
    assert main(["run", *TINY, f"output.dir={tmp_path / 'ref'}"]) == 0
    return _students(tmp_path / "ref")


class _Died(Exception):
    """Stands in for the process dying inside a write."""


def test_a_torn_last_line_of_the_metric_log_is_dropped_on_resume(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    renames = [0]

    def die_at_third_checkpoint(tmp):
        renames[0] += 1
        if renames[0] == 6:  # config, teacher.json, baseline checkpoints 5, 10, then inside 15
            raise _Died

    fileio.HOOKS["before_rename"].append(die_at_third_checkpoint)
    try:
        with pytest.raises(_Died):
            main(["run", *TINY, f"output.dir={run_dir}"])
    finally:
        fileio.HOOKS["before_rename"].remove(die_at_third_checkpoint)
    log = run_dir / "seed-0" / "baseline" / "metrics.jsonl"
    with log.open("a") as fh:
        fh.write('{"step": 16, "split": "tra')  # the write a full disk cut short
    capsys.readouterr()
    assert main(["run", *TINY, f"output.dir={run_dir}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 incomplete line(s)" in out and str(log) in out
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"]
    assert steps == list(range(1, 21))
    _assert_same(_students(run_dir), reference)
    TALLY["corruptions detected"] += 1


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``path``; the reason it cannot be done, or None."""
    if shutil.which("mount") is None:
        return "no mount command"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    return None if proc.returncode == 0 else f"mount -t tmpfs refused: {proc.stderr.strip()}"


def test_a_full_disk_stops_with_a_message_and_resume_finishes_identically(tmp_path, reference, capsys):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "160k")
    if reason is not None:
        pytest.skip(f"disk-full test needs a small tmpfs: {reason}")
    try:
        run_dir = disk / "run"
        capsys.readouterr()
        assert main(["run", *TINY, f"output.dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
        for ckpt in (c for arm in run_dir.glob("seed-0/*") for c in checkpoint_dirs(arm)):
            verify_manifest(ckpt)  # a checkpoint is complete or not there at all
        # the same wall again: still a clean error, never a crash on the torn files
        assert main(["run", *TINY, f"output.dir={run_dir}", "--resume"]) == 2
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        capsys.readouterr()
        assert main(["run", *TINY, f"output.dir={run_dir}", "--resume"]) == 0, capsys.readouterr().err
        _assert_same(_students(run_dir), reference)
        TALLY["disk-full runs resumed identical"] += 1
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)  # open handles may linger
