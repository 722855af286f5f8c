"""``teacher.source: cache`` end to end: a run from the cache trains the same student as a run with the
live teacher; ``distillery cache`` writes the caches a run then reads; the on-policy mix calls the
live teacher on sampled batches only; bad settings exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.cli import main

LM_TINY = [
    "teacher.train.steps=6", "train.steps=6", "train.eval_every=0", "data.max_train_blocks=48", "data.max_eval_blocks=8",
    "data.seq_len=32", "data.tokenizer.vocab_size=300", "baseline.enabled=false", "--no-progress",
]  # fmt: skip
ARITH = ["data.name=arithmetic", "data.seq_len=16", "data.arithmetic.train=120", "data.arithmetic.test=12",
         "data.tokenizer={kind: byte}", "method.max_new_tokens=4"]  # fmt: skip
DIGITS_TINY = [
    "seeds=[0]", "teacher.train.steps=30", "teacher.ensemble=1", "train.steps=40", "train.eval_every=0",
    "baseline.enabled=false", "--no-progress",
]  # fmt: skip
DENSE = ["teacher.source=cache", "teacher.outputs.kind=dense", "teacher.outputs.values=fp32"]
_LIVE: dict[tuple[str, ...], tuple[dict, Path]] = {}  # live-teacher runs, by their extra settings


def _run(args: list[str], out: Path) -> dict:
    assert main(["run", *args, f"output.dir={out}"]) == 0
    return json.loads((out / "seed-0" / "distilled" / "result.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    arm = out / "seed-0" / "distilled"
    path = arm / "model" / "model.safetensors" if (arm / "model").is_dir() else arm / "student.safetensors"
    return load_file(str(path))


def _close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"students differ by {worst}"
    return worst


@pytest.mark.integration
@pytest.mark.parametrize(
    "extra, cached",
    [
        ([], DENSE),  # token-level, dense fp32 cache
        (["chunked_loss.enabled=true"], DENSE),  # a chunked student reads the dense cache as k = V ids
        (
            [],
            [
                "teacher.source=cache",
                "teacher.outputs.kind=topk",
                "teacher.outputs.k=300",
                "teacher.outputs.values=fp32",
            ],
        ),
        (
            [*ARITH, "method.name=on_policy", "method.student_lambda=0.5"],
            DENSE,
        ),  # off-policy batches from the cache
    ],
    ids=["dense", "dense-chunked", "topk-k=V", "on-policy"],
)
def test_an_lm_run_from_the_cache_trains_the_live_teachers_student(tmp_path, tmp_path_factory, extra, cached):
    key = tuple(extra)  # the live runs of the same settings are shared by the cases
    if key not in _LIVE:
        out = tmp_path_factory.mktemp("live")
        _LIVE[key] = (_run(["lm-kd", *LM_TINY, *extra], out), out)
    live, live_dir = _LIVE[key]
    from_cache = _run(["lm-kd", *LM_TINY, *extra, *cached], tmp_path / "cache")
    # the cache was written in batches of eval.batch_size rows, training batches differ: float tolerance only
    _close(_weights(live_dir), _weights(tmp_path / "cache"), 2e-5)
    calls = from_cache["teacher_calls"]
    if "method.name=on_policy" in extra:
        sampled = from_cache["sampling"]["on_policy_fraction"]
        assert 0 < calls["live"] < 6 and calls["live"] + calls["cache"] == 6
        assert calls["live"] / 6 == pytest.approx(sampled) == live["sampling"]["on_policy_fraction"]
    else:
        assert calls == {"cache": 6, "live": 0}


@pytest.mark.integration
def test_a_classification_run_from_the_cache_equals_the_live_teacher(tmp_path):
    _run(["digits-kd", *DIGITS_TINY], tmp_path / "live")
    _run(["digits-kd", *DIGITS_TINY, *DENSE], tmp_path / "cache")
    assert _close(_weights(tmp_path / "live"), _weights(tmp_path / "cache"), 1e-6) == 0.0


@pytest.mark.integration
def test_distillery_cache_writes_what_runs_then_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "dc"))
    sparse = ["teacher.source=cache", "teacher.outputs.kind=sampled", "teacher.outputs.k=16",
              f"teacher.outputs.path={tmp_path / 'outputs'}", "teacher.outputs.write=never"]  # fmt: skip
    # write=never: the run refuses an absent cache, and names the command that writes it
    assert main(["run", "lm-kd", *LM_TINY, *sparse, f"output.dir={tmp_path / 'r0'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "no teacher-output cache at" in err and "distillery cache" in err and not (tmp_path / "r0").exists()
    )
    assert main(["cache", "lm-kd", *LM_TINY, *sparse]) == 0
    printed = capsys.readouterr().out
    assert "teacher outputs: sampled k=16, fp16, 48 rows" in printed and "B/token (written in" in printed
    manifest = json.loads((tmp_path / "outputs" / "seed-0" / "MANIFEST.json").read_text())
    assert manifest["kind"] == "sampled" and manifest["draws"] == 16 and manifest["dataset"]["rows"] == 48
    record = _run(["lm-kd", *LM_TINY, *sparse], tmp_path / "r1")
    assert "(read)" in capsys.readouterr().out and record["teacher_calls"] == {"cache": 6, "live": 0}
    assert main(["cache", "lm-kd", *LM_TINY, *sparse]) == 0  # complete: checked and left as it is
    assert "(read)" in capsys.readouterr().out


BAD = [
    (["digits-kd"], "distillery cache writes the outputs of a teacher with teacher.source=cache"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=8", "loss.forward_kl.temperature=2"],
     "loss.forward_kl.temperature=2, but the topk cache stores the teacher's distribution at teacher.outputs.temperature=1"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=sampled", "teacher.outputs.k=8", "loss={ce: {}, reverse_kl: {}}"],
     "reverse_kl"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=8", "loss={ce: {}, tvd: {}}"],
     "loss.tvd (tvd) needs the teacher's full logits"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=topk"], "kind=topk needs teacher.outputs.k"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=0"], "greater than or equal to 1"),
    (["lm-kd", "teacher.source=cache", "teacher.outputs.kind=full"], "'dense', 'topk' or 'sampled'"),
    (["lm-kd", "teacher.outputs.values=fp16"], "teacher.outputs describes a cache of the teacher's outputs"),
    (["lm-kd", "teacher.source=cache", *ARITH, "method.name=speculative"], "method.name=speculative"),
    (["digits-kd", "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=3"],
     "a classifier's cache stores its dense logits"),
    (["digits-kd", "teacher.source=cache", "train.augment.shift=1"], "teacher.source=cache stores one output per example"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_cache_settings_exit_2_naming_the_problem(args, message, capsys, tmp_path):
    command = "cache" if message.startswith("distillery cache") else "run"
    assert main([command, *args, f"output.dir={tmp_path / 'out'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_k_above_the_vocabulary_is_refused_before_training_the_student(tmp_path, capsys):
    args = ["lm-kd", *LM_TINY, "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=301"]
    assert main(["run", *args, f"output.dir={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert "teacher.outputs.k=301 must be between 1 and the vocabulary size 300" in captured.err
    assert "teacher:" not in captured.out and not (tmp_path / "out").exists()  # before any training


@pytest.mark.integration
def test_a_file_the_manifest_does_not_list_is_named_in_a_warning_and_never_read(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "dc"))
    sparse = ["teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=8",
              f"teacher.outputs.path={tmp_path / 'outputs'}"]  # fmt: skip
    assert main(["cache", "lm-kd", *LM_TINY, *sparse]) == 0
    (tmp_path / "outputs" / "seed-0" / ".shard-00009.safetensors.tmp").write_bytes(b"half a shard")
    capsys.readouterr()
    _run(["lm-kd", *LM_TINY, *sparse], tmp_path / "run")
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "warning:" in out
        and "files the cache's manifest does not list, never read: .shard-00009.safetensors.tmp" in out
    )


@pytest.mark.integration
def test_a_representation_run_reads_the_teachers_signals_from_the_cache(tmp_path, monkeypatch):
    """loss.features and loss.rkd_distance read the teacher's layers; with a cache they are stored per
    example beside the logits, and the student trains as with the live teacher."""
    terms = ["student={name: cnn, channels: [8, 16, 16]}", "loss.features={student: body.3, teacher: body.3}",
             "loss.rkd_distance={student: body.8, teacher: body.8, weight: 25}"]  # fmt: skip
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "dc"))
    _run(["digits-kd", *DIGITS_TINY, *terms], tmp_path / "live")
    record = _run(["digits-kd", *DIGITS_TINY, *terms, *DENSE], tmp_path / "cache")
    assert record["projectors"] == {"features.0": "conv1x1 16 -> 48 (768 parameters)"}
    _close(_weights(tmp_path / "live"), _weights(tmp_path / "cache"), 1e-6)
    (manifest_path,) = (tmp_path / "dc" / "outputs").glob("*/MANIFEST.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["features"] == ["features.0", "rkd_distance.0"]
    assert manifest["tensors"]["feature.features.0"]["shape"] == [48, 8, 8]


@pytest.mark.integration
def test_two_processes_write_the_same_cache_as_one(tmp_path):
    """Under `accelerate launch` each process writes its share of the shards and the main process the one
    manifest: the folder is byte-identical to the one process writes (same teacher, from the teacher cache)."""
    from tests.integration.test_ddp import launch, run_one_process

    env = {"DISTILLERY_CACHE": str(tmp_path / "dc")}
    args = ["cache", "lm-kd", *LM_TINY, "teacher.source=cache", "teacher.outputs.kind=topk", "teacher.outputs.k=16",
            "teacher.outputs.shard_rows=5"]  # fmt: skip
    run_one_process([*args, f"teacher.outputs.path={tmp_path / 'one'}"], tmp_path, env=env)
    launch(["-m", "distillery", *args, f"teacher.outputs.path={tmp_path / 'two'}"], tmp_path, env=env)
    one, two = tmp_path / "one" / "seed-0", tmp_path / "two" / "seed-0"
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 11 and names == sorted(p.name for p in two.iterdir())  # 10 shards + the manifest
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
