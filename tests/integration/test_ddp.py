"""Data parallelism: two CPU processes (gloo) give the same training as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.train import fit
from tests.integration.ddp_setup import config, data, model, objective, teacher

ROOT = Path(__file__).resolve().parents[2]


def launch(
    args: list[str], tmp_path: Path, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two CPU processes. ``--main_process_port 0`` lets the launcher bind a free
    rendezvous port itself (standalone mode): no port is picked here and handed over, so no other process
    can take it in between."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),  # the code under test, and tests/
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_one_process(args: list[str], tmp_path: Path, env: dict | None = None) -> None:
    """``python -m distillery <args>`` in one process, for comparison with ``launch``."""
    proc = subprocess.run(
        [sys.executable, "-m", "distillery", *args],
        cwd=tmp_path,
        env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    launch([str(ROOT / "tests" / "integration" / "ddp_worker.py"), str(out)], tmp_path)
    single = fit(model(), data(), objective(), config(), teacher=teacher(), seed=11, progress=False)
    ddp_state = load_file(str(out))
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ddp_state[name], value, atol=1e-5), name
    ddp_losses = json.loads((tmp_path / "ddp.safetensors.losses").read_text())
    assert ddp_losses == pytest.approx(single.last_losses, rel=1e-5)


@pytest.mark.integration
def test_cli_run_under_two_processes_matches_one_process(tmp_path):
    """`accelerate launch -m distillery run`: teacher and both students match a single-process run.

    Dropout and augmentation draw per-rank random numbers, so they are switched off for the comparison.
    """
    quick = ["seeds=[0]", "teacher.train.steps=20", "teacher.ensemble=1", "teacher.model.dropout=0",
             "teacher.train.augment.shift=0", "train.steps=24",
             "train.eval_every=12", "baseline.train.steps=24", "--no-progress"]  # fmt: skip
    env = {"DISTILLERY_CACHE": str(tmp_path / "cache-ddp")}
    launch(
        ["-m", "distillery", "run", "digits-kd", f"output.dir={tmp_path / 'ddp'}", *quick], tmp_path, env=env
    )
    run_one_process(
        ["run", "digits-kd", f"output.dir={tmp_path / 'one'}", *quick],
        tmp_path,
        env={"DISTILLERY_CACHE": str(tmp_path / "cache-one")},
    )
    for arm in ("baseline", "distilled"):
        ddp_w = load_file(str(tmp_path / "ddp" / "seed-0" / arm / "student.safetensors"))
        one_w = load_file(str(tmp_path / "one" / "seed-0" / arm / "student.safetensors"))
        for name, value in one_w.items():
            assert torch.allclose(ddp_w[name], value, atol=1e-4), (arm, name)
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    ddp_acc, one_acc = ddp_summary["per_seed_accuracy"][0], one_summary["per_seed_accuracy"][0]
    for key in ("teacher", "baseline", "distilled"):
        assert ddp_acc[key] == pytest.approx(one_acc[key], abs=1e-6), key


@pytest.mark.integration
def test_past_predictions_table_is_gathered_across_processes(tmp_path):
    """PS-KD under two processes: each rank sees half of every batch, but the table of past predictions
    must hold every example's prediction (gathered), so the students match a single-process run."""
    quick = ["seeds=[0]", "train.steps=30", "train.eval_every=0", "baseline.train.steps=4", "--no-progress"]
    # 1300 examples / 128 per step: about 10 steps per epoch, so epochs 2 and 3 read the table
    launch(["-m", "distillery", "run", "digits-pskd", f"output.dir={tmp_path / 'ddp'}", *quick], tmp_path)
    run_one_process(["run", "digits-pskd", f"output.dir={tmp_path / 'one'}", *quick], tmp_path)
    ddp_w = load_file(str(tmp_path / "ddp" / "seed-0" / "distilled" / "student.safetensors"))
    one_w = load_file(str(tmp_path / "one" / "seed-0" / "distilled" / "student.safetensors"))
    for name, value in one_w.items():
        assert torch.allclose(ddp_w[name], value, atol=1e-4), name


@pytest.mark.integration
@pytest.mark.parametrize("chunked", ["false", "true"])
def test_lm_run_under_two_processes_matches_one_process(tmp_path, chunked):
    """Token-level KD of a causal LM: the loss is normalised by the valid tokens of the global batch,
    so two processes (each with half the sequences, different token counts) train the same student,
    with the full-logit loss and with the chunked one (hidden states read through DDP)."""
    quick = [f"chunked_loss.enabled={chunked}", "teacher.train.steps=4", "train.steps=4", "train.eval_every=0", "baseline.enabled=false",
             "data.max_train_blocks=64", "data.max_eval_blocks=4", "data.seq_len=32",
             "data.tokenizer.vocab_size=300", "--no-progress"]  # fmt: skip
    env = {"DISTILLERY_CACHE": str(tmp_path / "cache-ddp")}
    launch(["-m", "distillery", "run", "lm-kd", f"output.dir={tmp_path / 'ddp'}", *quick], tmp_path, env=env)
    run_one_process(
        ["run", "lm-kd", f"output.dir={tmp_path / 'one'}", *quick],
        tmp_path,
        env={"DISTILLERY_CACHE": str(tmp_path / "cache-one")},
    )
    ddp_w = load_file(str(tmp_path / "ddp" / "seed-0" / "distilled" / "model" / "model.safetensors"))
    one_w = load_file(str(tmp_path / "one" / "seed-0" / "distilled" / "model" / "model.safetensors"))
    for name, value in one_w.items():
        assert torch.allclose(ddp_w[name], value, atol=1e-4), name


@pytest.mark.integration
def test_launches_do_not_need_a_port_picked_in_advance(tmp_path):
    """Two launches at once, each binding its own rendezvous port (port 0), while the launcher's
    default port is taken: both run."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # someone else holds it already, which is the point
        outs = [tmp_path / f"ddp-{k}.safetensors" for k in range(2)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda out: launch([str(ROOT / "tests" / "integration" / "ddp_worker.py"), str(out)],
                                             tmp_path), outs))  # fmt: skip
    first, second = (load_file(str(out)) for out in outs)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.integration
def test_self_supervised_run_under_two_processes_matches_one_process(tmp_path):
    """DINO on digits: the views (a function of seed, image id and step), the centre (all-reduced over
    processes), the EMA teacher and the student match one process with the same global batch. The
    backbone has no batch norm here: per-process batch statistics would differ from the global batch's
    (DINO uses SyncBatchNorm on GPUs for that)."""
    from safetensors.torch import load_file as load

    quick = ["seeds=[0]", "train.steps=12", "train.eval_every=6", "model.backbone.batch_norm=false",
             "baseline.enabled=false", "--no-progress"]  # fmt: skip
    launch(["-m", "distillery", "run", "digits-dino", f"output.dir={tmp_path / 'ddp'}", *quick], tmp_path)
    run_one_process(["run", "digits-dino", f"output.dir={tmp_path / 'one'}", *quick], tmp_path)
    arm = Path("seed-0") / "distilled"
    ddp, one = (
        load(tmp_path / "ddp" / arm / "student.safetensors"),
        load(tmp_path / "one" / arm / "student.safetensors"),
    )
    assert ddp.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    ddp_rec = json.loads((tmp_path / "ddp" / arm / "result.json").read_text())
    one_rec = json.loads((tmp_path / "one" / arm / "result.json").read_text())
    for a, b in zip(ddp_rec["history"], one_rec["history"]):  # the centre shows in the target entropies
        assert a["teacher_entropy"] == pytest.approx(b["teacher_entropy"], rel=1e-4)
        assert a["teacher_mean_entropy"] == pytest.approx(b["teacher_mean_entropy"], rel=1e-4)
    assert ddp_rec["metrics"]["knn"] == pytest.approx(one_rec["metrics"]["knn"], abs=0.5)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["digits-mean-teacher", "digits-fixmatch"])
def test_semi_supervised_runs_under_two_processes_match_one_process(tmp_path, recipe):
    """Mean Teacher (its EMA teacher and consistency term) and FixMatch (the teacher's pseudo-labels
    over a confidence threshold, normalised by the global count of kept rows): the student matches one
    process with the same global batch. Dropout is off: its draws are per process (Noisy Student needs
    it, so it is not compared)."""
    quick = ["seeds=[0]", "train.steps=12", "train.eval_every=6", "student.dropout=0", "baseline.enabled=false",
             "--no-progress"]  # fmt: skip
    launch(["-m", "distillery", "run", recipe, f"output.dir={tmp_path / 'ddp'}", *quick], tmp_path)
    run_one_process(["run", recipe, f"output.dir={tmp_path / 'one'}", *quick], tmp_path)
    arm = Path("seed-0") / "distilled"
    ddp, one = (load_file(str(tmp_path / w / arm / "student.safetensors")) for w in ("ddp", "one"))
    assert ddp.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    a, b = (json.loads((tmp_path / w / arm / "result.json").read_text()) for w in ("ddp", "one"))
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [6, 12]
    assert a["metrics"]["accuracy"] == pytest.approx(b["metrics"]["accuracy"], abs=0.5)
