"""Damaged checkpoints and teacher-cache entries, through the real command line.

A small digits-kd run (one seed, distilled arm only) is stopped at its last checkpoint's rename, as a
kill would stop it; the tests damage a copy of what it left and resume it. The runs share one teacher
cache (trained once, by the reference run), except the tests that damage a cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery import fileio
from distillery.cli import main
from distillery.train.checkpoint import checkpoint_dirs
from tests.faults.conftest import TALLY

pytestmark = pytest.mark.integration

STEPS = 24
TINY = [
    "seeds=[0]",
    "baseline.enabled=false",
    "teacher.ensemble=1",
    "teacher.train.steps=12",
    f"train.steps={STEPS}",
    "train.checkpoint_every=8",
    "train.keep_checkpoints=2",
    "train.eval_every=0",
    "train.log_every=4",
    "output.tensorboard=false",
]
ARM = Path("seed-0") / "distilled"


class Killed(Exception):
    """Stands in for the process dying inside a write."""


def run_cli(capsys, run_dir: Path, cache: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(
        ["run", "--no-progress", *TINY, f"output.dir={run_dir}", f"teacher.cache_dir={cache}", *extra]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(path)).items()}  # copies: the file may be mapped


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def teacher_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted reference run, and a run killed just before its final checkpoint's rename
    (checkpoints step 8 and 16 left, step 24's folder still temporary)."""
    base = tmp_path_factory.mktemp("runs")
    cache = base / "cache"
    reference = base / "reference"
    assert main(["run", "--no-progress", *TINY, f"output.dir={reference}", f"teacher.cache_dir={cache}"]) == 0

    def kill_at_last_checkpoint(tmp: Path) -> None:
        if tmp.name == f".step-{STEPS:08d}.tmp":
            raise Killed

    killed = base / "killed"
    fileio.HOOKS["before_rename"].append(kill_at_last_checkpoint)
    try:
        with pytest.raises(Killed):
            main(["run", "--no-progress", *TINY, f"output.dir={killed}", f"teacher.cache_dir={cache}"])
    finally:
        fileio.HOOKS["before_rename"].remove(kill_at_last_checkpoint)
    assert [p.name for p in checkpoint_dirs(killed / ARM)] == ["step-00000008", "step-00000016"]
    return {"reference": reference, "killed": killed, "cache": cache}


@pytest.fixture
def killed(runs, tmp_path) -> Path:
    """A private copy of the killed run."""
    copy = tmp_path / "killed"
    shutil.copytree(runs["killed"], copy)
    return copy


def newest(run_dir: Path) -> Path:
    return checkpoint_dirs(run_dir / ARM)[-1]


def oldest(run_dir: Path) -> Path:
    return checkpoint_dirs(run_dir / ARM)[0]


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the last tensor's values
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resume_matches_reference(capsys, runs, run_dir: Path) -> str:
    code, out, err = run_cli(capsys, run_dir, runs["cache"], "--resume")
    assert code == 0, err
    assert_same_weights(
        run_dir / ARM / "student.safetensors", runs["reference"] / ARM / "student.safetensors"
    )
    return out


# ---- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_and_teacher_entries_carry_a_manifest(runs):
    assert [p.name for p in checkpoint_dirs(runs["reference"] / ARM)] == ["step-00000016", "step-00000024"]
    for ckpt in checkpoint_dirs(runs["reference"] / ARM):
        fileio.verify_manifest(ckpt)
    fileio.verify_manifest(teacher_entry(runs["cache"]))


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (flip_bytes, "model.safetensors", "sha256"),
        (truncate, "optimizer.pt", "truncated"),
        (Path.unlink, "trainer.pt", "missing"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    capsys, runs, killed, damage, file, problem
):
    damaged = newest(killed) / file
    damage(damaged)
    out = resume_matches_reference(capsys, runs, killed)
    line = next(line for line in out.splitlines() if "is damaged" in line)
    assert "checkpoint step-00000016 is damaged" in line and str(damaged) in line and problem in line
    assert "resuming from step-00000008 instead" in line
    TALLY["corruptions detected"] += 1


def test_damaged_older_checkpoint_is_not_used_when_the_newest_is_intact(capsys, runs, killed):
    assert (newest(killed) / fileio.MANIFEST).is_file()
    flip_bytes(oldest(killed) / "model.safetensors")
    out = resume_matches_reference(capsys, runs, killed)
    assert "is damaged" not in out and "unverified" not in out


def test_every_checkpoint_damaged_is_a_user_error_naming_the_files(capsys, runs, killed):
    flip_bytes(newest(killed) / "model.safetensors")
    truncate(oldest(killed) / "trainer.pt")
    code, _, err = run_cli(capsys, killed, runs["cache"], "--resume")
    assert code == 2 and "Traceback" not in err
    err = " ".join(err.split())
    assert "every checkpoint" in err and "is damaged" in err
    assert str(newest(killed) / "model.safetensors") in err and str(oldest(killed) / "trainer.pt") in err
    assert f"Delete {killed / ARM / 'checkpoints'}" in err
    TALLY["corruptions detected"] += 2


def test_checkpoint_without_manifest_is_resumed_unverified(capsys, runs, killed):
    (newest(killed) / fileio.MANIFEST).unlink()  # as an older distillery wrote it
    out = resume_matches_reference(capsys, runs, killed)
    assert "checkpoint step-00000016 has no MANIFEST.json" in out and "unverified" in out


def test_undecodable_file_of_an_unverified_checkpoint_is_a_user_error(capsys, runs, killed):
    (newest(killed) / fileio.MANIFEST).unlink()
    (newest(killed) / "optimizer.pt").write_bytes(b"not a pickle at all" * 8)
    code, _, err = run_cli(capsys, killed, runs["cache"], "--resume")
    assert code == 2 and "Traceback" not in err
    assert str(newest(killed) / "optimizer.pt") in " ".join(err.split()) and "cannot be read" in err
    TALLY["corruptions detected"] += 1


# ---- the teacher cache -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "damage", "problem"),
    [
        ("model.safetensors", flip_bytes, "sha256"),
        ("model.safetensors", truncate, "truncated"),
        ("meta.json", Path.unlink, "missing"),
    ],
)
def test_damaged_teacher_is_moved_aside_and_retrained(capsys, runs, tmp_path, file, damage, problem):
    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    entry = teacher_entry(cache)
    reference_weights = weights(entry / "model.safetensors")
    damage(entry / file)
    before = sorted(p.name for p in entry.iterdir())

    code, out, err = run_cli(capsys, tmp_path / "run", cache)
    assert code == 0, err
    line = next(line for line in out.splitlines() if "is damaged" in line)
    (moved,) = (cache / ".damaged").iterdir()
    assert str(entry / file) in line and problem in line and f"moved it aside to {moved}" in line
    assert sorted(p.name for p in moved.iterdir()) == before  # kept as it was, nothing deleted
    assert "teacher:" in out and "trained in" in out
    fileio.verify_manifest(entry)  # a new, intact entry under the same key ...
    retrained = weights(entry / "model.safetensors")  # ... equal to the teacher trained from scratch
    assert retrained.keys() == reference_weights.keys()
    assert all(torch.equal(retrained[k], reference_weights[k]) for k in retrained)
    TALLY["corruptions detected"] += 1


def test_cache_dir_that_is_a_file_is_a_config_error(capsys, runs, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    code, out, err = run_cli(capsys, tmp_path / "run", blocker)
    assert code == 2 and "Traceback" not in err
    err = " ".join(err.split())
    assert str(blocker) in err and "DISTILLERY_CACHE" in err and "writable folder" in err
    assert "trained in" not in out  # refused before training, not after
    assert blocker.read_text() == "x"
    assert {p.name for p in tmp_path.iterdir()} <= {"not-a-folder", "run"}  # nothing written beside it
    TALLY["bad inputs with a clean exit 2"] += 1


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions (root ignores them)"
)
def test_read_only_cache_dir_is_a_config_error(capsys, runs, tmp_path):
    cache = tmp_path / "read-only"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, tmp_path / "run", cache)
    finally:
        cache.chmod(0o755)
    assert code == 2 and "Traceback" not in err
    err = " ".join(err.split())
    assert str(cache) in err and "writable folder" in err
    assert list(cache.iterdir()) == []
    TALLY["bad inputs with a clean exit 2"] += 1


# ---- a finished arm ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (truncate, "result.json", "result.json is damaged"),
        (flip_bytes, "student.safetensors", "student.safetensors is damaged (its sha256"),
        (Path.unlink, "student.safetensors", "student.safetensors is missing"),
    ],
)
def test_a_damaged_finished_arm_is_finished_again_from_its_last_checkpoint(
    capsys, runs, tmp_path, damage, file, problem
):
    run_dir = tmp_path / "finished"
    shutil.copytree(runs["reference"], run_dir)
    damage(run_dir / ARM / file)
    out = resume_matches_reference(capsys, runs, run_dir)
    text = " ".join(out.split())  # the console wraps long lines
    assert f"{problem}" in text and "finishing the arm again from its last checkpoint" in text
    again = json.loads((run_dir / ARM / "result.json").read_text())
    assert again["metrics"] == json.loads((runs["reference"] / ARM / "result.json").read_text())["metrics"]
    TALLY["corruptions detected"] += 1
