"""Kills and signals at exact moments, then ``--resume``: the resumed run ends bit-identical to one
that was never interrupted (every saved student, every reported number), in one process and under
two-process data parallelism.

The faults are injected by ``tests/faults/_killer.py``: SIGKILL right after a given training step,
SIGKILL inside the N-th durable write (its temporary file or folder complete, the rename not done),
and SIGINT / SIGTERM during a step (training checkpoints, then exits 130 / 143).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.fileio import verify_manifest
from distillery.train.checkpoint import checkpoint_dirs
from tests.faults.conftest import TALLY

ROOT = Path(__file__).resolve().parents[2]
KILLER = ROOT / "tests" / "faults" / "_killer.py"
# One seed, a 20-step teacher, two 30-step arms with a checkpoint every 5 steps (two kept): each
# process takes a few seconds. Logged every step, so that step N is a moment the killer can name.
TINY = [
    "digits-kd", "seeds=[0]", "teacher.train.steps=20", "teacher.ensemble=1", "train.steps=30",
    "baseline.train.steps=30", "train.eval_every=10", "train.log_every=1", "train.checkpoint_every=5",
    "train.keep_checkpoints=2", "--no-progress",
]  # fmt: skip
ARM_STEPS = 30  # the killer counts training records over both arms: 1..30 baseline, 31..60 distilled


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DISTILLERY_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }


def distillery(args: list[str], cache: Path, fault: tuple[str, int | str] | None = None):
    head = (
        [sys.executable, str(KILLER), fault[0], str(fault[1]), "--"]
        if fault
        else [sys.executable, "-m", "distillery"]
    )
    return subprocess.run(
        [*head, "run", *args], cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300
    )


# Fields of result.json that differ between equal runs: wall times, and the checksums of the saved
# files (the model card names its run folder). The weights themselves are compared directly.
VARYING = ("seconds", "samples_per_second", "files")


def outcome(run_dir: Path) -> dict:
    """Every saved student's weights and every reported number of a finished run."""
    weights = {
        str(p.relative_to(run_dir)): load_file(str(p))
        for p in sorted(run_dir.glob("seed-*/*/student.safetensors"))
    }
    results = {
        str(p.relative_to(run_dir)): {k: v for k, v in json.loads(p.read_text()).items() if k not in VARYING}
        for p in sorted(run_dir.glob("seed-*/*/result.json"))
    }
    metrics = json.loads((run_dir / "summary.json").read_text())["per_seed_accuracy"]
    return {"weights": weights, "results": results, "summary": metrics}


def assert_identical(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys() and len(a["weights"]) == 2
    for name in a["weights"]:
        for key, value in a["weights"][name].items():
            assert torch.equal(value, b["weights"][name][key]), (name, key)
    assert a["results"] == b["results"]
    assert a["summary"] == b["summary"]


def assert_no_half_written_checkpoint(run_dir: Path) -> None:
    for arm in run_dir.glob("seed-*/*"):
        for ckpt in checkpoint_dirs(arm):
            verify_manifest(ckpt)  # raises on a checkpoint that is not complete


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict:
    run_dir = tmp_path_factory.mktemp("kill-ref") / "run"
    proc = distillery([*TINY, f"output.dir={run_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outcome(run_dir)


# 3: before the first checkpoint (the arm restarts, its log too); 37: inside the second arm; one
# more drawn from a fixed seed (a failure names its step and reruns the same way). `-m slow` adds
# eight more drawn steps.
_DRAWN = random.Random(20261201).sample([s for s in range(1, 2 * ARM_STEPS + 1) if s not in (3, 37)], 9)
KILL_STEPS = [3, 37, _DRAWN[0], *(pytest.param(s, marks=pytest.mark.slow) for s in _DRAWN[1:])]


@pytest.mark.integration
@pytest.mark.parametrize("step", KILL_STEPS)
def test_sigkill_after_a_step_then_resume_is_identical(step, tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    killed = distillery([*TINY, f"output.dir={run_dir}"], cache, fault=("step", step))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert_no_half_written_checkpoint(run_dir)
    resumed = distillery([*TINY, f"output.dir={run_dir}", "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(outcome(run_dir), reference)
    # one history per arm: the log of an arm restarted or resumed holds each step once
    for log in run_dir.glob("seed-*/*/metrics.jsonl"):
        steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"]
        assert steps == list(range(1, ARM_STEPS + 1)), log
    TALLY["kills survived identical"] += 1


# Inside the teacher-cache entry's rename, the baseline's first and fourth checkpoints, and the
# baseline's result.json (each named by a piece of its temporary path).
WRITES = {
    "cache-entry": "/teachers/.",
    "first-checkpoint": "baseline/checkpoints/.step-00000005",
    "fourth-checkpoint": "baseline/checkpoints/.step-00000020",
    "result": "baseline/.result.json",
}


@pytest.mark.integration
@pytest.mark.parametrize(
    "write",
    ["cache-entry", "fourth-checkpoint", "result", pytest.param("first-checkpoint", marks=pytest.mark.slow)],
)
def test_sigkill_inside_a_write_then_resume_is_identical(write, tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    fresh_cache = tmp_path / "cache" if write == "cache-entry" else cache  # the entry is written only once
    killed = distillery([*TINY, f"output.dir={run_dir}"], fresh_cache, fault=("rename", WRITES[write]))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert_no_half_written_checkpoint(run_dir)
    if write == "cache-entry":
        entries = [p for p in (fresh_cache / "teachers").iterdir() if not p.name.startswith(".")]
        assert entries == [], "a teacher entry killed before its rename must not be visible"
    resumed = distillery([*TINY, f"output.dir={run_dir}", "--resume"], fresh_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(outcome(run_dir), reference)
    TALLY["kills survived identical"] += 1


@pytest.mark.integration
@pytest.mark.parametrize(("signal_name", "code", "step"), [("sigint", 130, 8), ("sigterm", 143, 44)])
def test_sigint_and_sigterm_checkpoint_exit_then_resume_is_identical(
    signal_name, code, step, tmp_path, cache, reference
):
    run_dir = tmp_path / "run"
    stopped = distillery([*TINY, f"output.dir={run_dir}"], cache, fault=(signal_name, step))
    assert stopped.returncode == code, stopped.stderr[-2000:]
    arm_step = step if step <= ARM_STEPS else step - ARM_STEPS
    assert f"after step {arm_step} of {ARM_STEPS}" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    arm = "baseline" if step <= ARM_STEPS else "distilled"
    assert checkpoint_dirs(run_dir / "seed-0" / arm)[-1].name == f"step-{arm_step:08d}"
    resumed = distillery([*TINY, f"output.dir={run_dir}", "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(outcome(run_dir), reference)
    TALLY["kills survived identical"] += 1


# ---- two processes (gloo on CPU) ------------------------------------------------------------------

DDP_TINY = [a for a in TINY if not a.startswith("train.log_every")] + [
    "train.log_every=1", "teacher.model.dropout=0", "teacher.train.augment.shift=0", "train.batch_size=64",
    "baseline.train.batch_size=64",
]  # fmt: skip


def launch(args: list[str], tmp_path: Path, cache: Path, fault: tuple[str, int] | None = None):
    head = [str(KILLER), fault[0], str(fault[1]), "--"] if fault else ["-m", "distillery"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *head, "run", *args,
    ]  # fmt: skip
    env = {**_env(cache), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.integration
def test_two_processes_sigkill_and_sigterm_then_resume_are_identical(tmp_path):
    cache = tmp_path / "cache"
    ref = launch([*DDP_TINY, f"output.dir={tmp_path / 'ref'}"], tmp_path, cache)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    reference = outcome(tmp_path / "ref")
    for fault in [("step", 12), ("sigterm", 41)]:
        run_dir = tmp_path / fault[0]
        stopped = launch([*DDP_TINY, f"output.dir={run_dir}"], tmp_path, cache, fault=fault)
        assert stopped.returncode != 0
        if fault[0] == "sigterm":  # both processes stopped after the same step and checkpointed it
            ckpt = checkpoint_dirs(run_dir / "seed-0" / "distilled")[-1]
            assert ckpt.name == "step-00000011" and {p.name for p in ckpt.glob("rng-rank*.pt")} == {
                "rng-rank0.pt",
                "rng-rank1.pt",
            }
        assert_no_half_written_checkpoint(run_dir)
        resumed = launch([*DDP_TINY, f"output.dir={run_dir}", "--resume"], tmp_path, cache)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert_identical(outcome(run_dir), reference)
        TALLY["kills survived identical"] += 1


@pytest.mark.integration
def test_a_self_supervised_run_killed_mid_training_resumes_identical(tmp_path, cache):
    """DINO: the views (drawn from seed, image id and step), the EMA teacher, the centre (a buffer of
    the objective) and the last-layer freeze all come back on resume: the student ends bit-identical."""
    args = ["digits-dino", "seeds=[0]", "train.steps=12", "train.eval_every=6", "train.log_every=1",
            "train.checkpoint_every=3", "baseline.enabled=false", "--no-progress"]  # fmt: skip
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert distillery([*args, f"output.dir={ref_dir}"], cache).returncode == 0
    killed = distillery([*args, f"output.dir={run_dir}"], cache, fault=("step", 8))
    assert killed.returncode != 0 and not (run_dir / "summary.json").exists()
    resumed = distillery([*args, f"output.dir={run_dir}", "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(ref_dir / "seed-0" / "distilled" / "student.safetensors"))
    b = load_file(str(run_dir / "seed-0" / "distilled" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (
        json.loads((d / "seed-0" / "distilled" / "result.json").read_text()) for d in (ref_dir, run_dir)
    )
    assert ra["metrics"] == rb["metrics"] and ra["history"] == rb["history"]


FSDP_TINY = [*DDP_TINY, "train.parallel=fsdp", "baseline.train.parallel=fsdp"]


@pytest.mark.integration
def test_fsdp_sigkill_after_a_step_and_inside_a_sharded_write_then_resume_are_identical(tmp_path):
    """Two processes, student and teacher sharded: SIGKILL of the main process after a step, and of the
    second process right after it wrote its shard of a checkpoint (the main process still inside the same
    write: no manifest yet, the temporary folder not renamed). Each resumes from its newest complete
    sharded checkpoint and ends bit-identical to the run that was never interrupted."""
    cache = tmp_path / "cache"
    ref = launch([*FSDP_TINY, f"output.dir={tmp_path / 'ref'}"], tmp_path, cache)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    reference = outcome(tmp_path / "ref")
    # a step of the distilled arm drawn from a fixed seed (11-19: after its second checkpoint), and the
    # distilled arm's third checkpoint write (the baseline wrote 6: shard 9 is step 15)
    step = random.Random(20261204).randint(ARM_STEPS + 11, ARM_STEPS + 19)
    for fault in [("step", step), ("shard", 9)]:
        run_dir = tmp_path / fault[0]
        stopped = launch([*FSDP_TINY, f"output.dir={run_dir}"], tmp_path, cache, fault=fault)
        assert stopped.returncode != 0
        arm = run_dir / "seed-0" / "distilled"
        last = 10 if fault[0] == "shard" else (step - ARM_STEPS) // 5 * 5  # the newest complete checkpoint
        assert [c.name for c in checkpoint_dirs(arm)] == [f"step-{last - 5:08d}", f"step-{last:08d}"], fault
        assert all((c / "sharded" / ".metadata").is_file() for c in checkpoint_dirs(arm))
        if fault[0] == "shard":  # the interrupted write: one temporary folder, never a step- name
            assert [p.name for p in (arm / "checkpoints").glob(".step-*")] == [".step-00000015.tmp"]
        assert_no_half_written_checkpoint(run_dir)
        resumed = launch([*FSDP_TINY, f"output.dir={run_dir}", "--resume"], tmp_path, cache)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert f"resumed from step {last} of 30" in resumed.stdout
        assert_identical(outcome(run_dir), reference)
        TALLY["kills survived identical"] += 1
