"""Fully sharded data parallelism (``train.parallel: fsdp``) on two CPU processes (gloo): the same
trained student as data parallelism and as one process with the same global batch, half of the
teacher's and the student's parameters on each process, exact resume from sharded checkpoints, a
damaged shard detected, and the classification and LM tasks run through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.errors import ConfigError
from distillery.losses import CrossEntropyLoss, KDLoss, Objective
from distillery.teachers.ema import EMATeacher
from distillery.train import TrainConfig, fit
from distillery.train.loop import _check_fsdp
from tests.integration.ddp_setup import config, data, model, objective, teacher
from tests.integration.test_ddp import launch, run_one_process

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "integration" / "fsdp_worker.py")


def single_process() -> dict[str, torch.Tensor]:
    return fit(
        model(), data(), objective(), config(), teacher=teacher(), seed=11, progress=False
    ).model.state_dict()


@pytest.mark.integration
def test_fsdp_trains_the_ddp_and_the_one_process_student_holding_half_of_each_model(tmp_path):
    fsdp, ddp = tmp_path / "fsdp.safetensors", tmp_path / "ddp.safetensors"
    launch([WORKER, str(fsdp), "fsdp"], tmp_path)
    launch([WORKER, str(ddp), "ddp"], tmp_path)
    sharded, replicated, one = load_file(str(fsdp)), load_file(str(ddp)), single_process()
    assert sharded.keys() == one.keys()
    for name, value in one.items():
        # the gradients are reduce-scattered instead of all-reduced: the same sums, in another order
        torch.testing.assert_close(sharded[name], value, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(sharded[name], replicated[name], atol=1e-6, rtol=1e-5, msg=name)
    seen = [json.loads(Path(f"{fsdp}.rank{r}.json").read_text()) for r in range(2)]
    for key in ("teacher", "student"):
        total = seen[0][f"{key}_total"]
        local = [s[f"{key}_local"] for s in seen]
        assert sum(local) == total and max(local) <= 0.55 * total, (key, local, total)
        assert all(s[f"{key}_after"] == total for s in seen)  # whole again after training (the export)
    held = [json.loads(Path(f"{ddp}.rank{r}.json").read_text()) for r in range(2)]
    assert all(s["teacher_local"] == s["teacher_total"] for s in held)  # ddp: every process holds all


@pytest.mark.integration
def test_fsdp_resume_is_exact_and_a_damaged_shard_falls_back_to_the_checkpoint_before(tmp_path):
    ref = tmp_path / "ref.safetensors"
    launch([WORKER, str(ref), "fsdp"], tmp_path)
    reference = load_file(str(ref))

    run = tmp_path / "run"  # stopped after step 7: checkpoint 5; resumed to 20
    launch([WORKER, str(tmp_path / "x"), "fsdp", str(run), "7"], tmp_path)
    ckpt = run / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    resumed = tmp_path / "resumed.safetensors"
    launch([WORKER, str(resumed), "fsdp", str(run), "resume"], tmp_path)
    assert json.loads(Path(f"{resumed}.rank1.json").read_text())["resumed_from"] == 5
    got = load_file(str(resumed))
    assert all(torch.equal(got[k], reference[k]) for k in reference)

    damaged = tmp_path / "damaged"  # stopped after step 12: checkpoints 5 and 10; one shard of 10 altered
    launch([WORKER, str(tmp_path / "y"), "fsdp", str(damaged), "12"], tmp_path)
    shard = damaged / "checkpoints" / "step-00000010" / "sharded" / "__1_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    out = tmp_path / "after-damage.safetensors"
    proc = launch([WORKER, str(out), "fsdp", str(damaged), "resume"], tmp_path)
    assert "step-00000010 is damaged" in proc.stdout and "__1_0.distcp" in proc.stdout, proc.stdout[-2000:]
    assert json.loads(Path(f"{out}.rank0.json").read_text())["resumed_from"] == 5
    got = load_file(str(out))
    assert all(torch.equal(got[k], reference[k]) for k in reference)


@pytest.mark.integration
@pytest.mark.parametrize(
    "recipe,quick,weights",
    [
        (
            "digits-kd",
            ["teacher.train.steps=20", "teacher.ensemble=1", "teacher.model.dropout=0",
             "teacher.train.augment.shift=0", "train.steps=24", "train.eval_every=12", "baseline.train.steps=24",
             "baseline.train.parallel=fsdp"],
            ["baseline/student.safetensors", "distilled/student.safetensors"],
        ),
        (
            "lm-kd",
            ["teacher.train.steps=4", "train.steps=4", "train.eval_every=2", "baseline.enabled=false",
             "data.max_train_blocks=64", "data.max_eval_blocks=4", "data.seq_len=32", "data.tokenizer.vocab_size=300"],
            ["distilled/model/model.safetensors"],
        ),
        (  # a LoRA student: the frozen base and the adapters sharded alike, the adapter and merged model saved
            "lm-kd",
            ["teacher.train.steps=4", "train.steps=4", "train.eval_every=2", "baseline.enabled=false",
             "data.max_train_blocks=64", "data.max_eval_blocks=4", "data.seq_len=32", "data.tokenizer.vocab_size=300",
             "student.peft={r: 2}"],
            ["distilled/adapter/adapter_model.safetensors", "distilled/model/model.safetensors"],
        ),
    ],
)  # fmt: skip
def test_cli_runs_under_fsdp_match_one_process(tmp_path, recipe, quick, weights):
    """`accelerate launch -m distillery run RECIPE train.parallel=fsdp`: the exported students (consolidated,
    loadable on one process) and the evaluation during training match a one-process run."""
    if any(q.startswith("student.peft") for q in quick):
        pytest.importorskip("peft", reason="LoRA students need the peft package (the peft extra)")
    args = ["seeds=[0]", *quick, "--no-progress"]
    proc = launch(
        ["-m", "distillery", "run", recipe, f"output.dir={tmp_path / 'fsdp'}", "train.parallel=fsdp", *args],
        tmp_path,
        env={"DISTILLERY_CACHE": str(tmp_path / "cache-fsdp")},
    )
    assert "processes: 2 (backend gloo)" in proc.stdout
    run_one_process(
        ["run", recipe, f"output.dir={tmp_path / 'one'}", *args],
        tmp_path,
        env={"DISTILLERY_CACHE": str(tmp_path / "cache-one")},
    )
    for rel in weights:
        sharded = load_file(str(tmp_path / "fsdp" / "seed-0" / rel))
        one = load_file(str(tmp_path / "one" / "seed-0" / rel))
        assert sharded.keys() == one.keys()
        for name, value in one.items():
            assert torch.allclose(sharded[name], value, atol=1e-4), (rel, name)
    arm = Path("seed-0") / "distilled" / "result.json"
    a, b = (json.loads((tmp_path / w / arm).read_text()) for w in ("fsdp", "one"))
    assert len(a["history"]) == len(b["history"]) >= 2  # every process evaluated (a sharded forward)
    for key, value in b["metrics"].items():
        assert a["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_fsdp_with_one_process_warns_and_trains_as_one_process(capsys):
    cfg = config().model_copy(update={"parallel": "fsdp"})
    result = fit(model(), data(), objective(), cfg, teacher=teacher(), seed=11, progress=False)
    assert "train.parallel=fsdp with one process shards nothing" in capsys.readouterr().out
    one = single_process()
    assert all(torch.equal(result.model.state_dict()[k], one[k]) for k in one)


def test_fsdp_refuses_what_it_cannot_shard_before_training():
    with pytest.raises(
        ConfigError, match=r"EMATeacher\) reads or copies the student's weights.*parallel=ddp"
    ):
        _check_fsdp(objective(), EMATeacher(model(), 0.99), None)
    learned = CrossEntropyLoss()
    learned.scale = torch.nn.Parameter(torch.ones(()))  # a term with its own parameter (a projector)
    with pytest.raises(ConfigError, match=r"loss term\(s\) learned have their own parameters"):
        _check_fsdp(Objective({"kd": KDLoss(2.0), "learned": learned}), teacher(), None)
    with pytest.raises(ConfigError, match="samples from the student"):
        _check_fsdp(Objective({"kd": KDLoss(2.0)}), teacher(), lambda b, m, s: b)
    assert TrainConfig(steps=1).parallel == "ddp"
