"""A distillation run whose teacher is behind a server (``teacher.source: server``): the same student as
with the local teacher, prefetch, the checks at start, and a server that dies mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")

from distillery.cli import main
from distillery.data.text.tokenizer import train_tokenizer
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.serving import create_app, free_port, launch
from tests.integration.test_lm import TINY
from tests.unit.test_server_teacher import LiveServer

ARITH = ["data.name=arithmetic", "data.seq_len=16", "data.arithmetic.train=64", "data.arithmetic.validation=4",
         "data.arithmetic.test=8", "data.arithmetic.digits=[1, 2]", "method.max_new_tokens=4"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny Llama with the byte tokenizer, saved with save_pretrained (the local and the served teacher)."""
    path = tmp_path_factory.mktemp("teacher") / "model"
    tok = train_tokenizer("", kind="byte", use_cache=False)
    torch.manual_seed(0)
    model = build_causal_lm(
        CausalLMConfig(hidden_size=24, layers=1, heads=2, max_positions=64), len(tok), tok
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _served(path: Path) -> LiveServer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return LiveServer(create_app(model, AutoTokenizer.from_pretrained(path), model_name="tiny-teacher"))


def _args(out: Path, *extra: str) -> list[str]:
    return ["run", "lm-kd", *TINY, *ARITH, "train.steps=4", "baseline.enabled=false",
            "data.tokenizer={kind: byte}", f"output.dir={out}", *extra]  # fmt: skip


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "seed-0" / "distilled" / "model" / "model.safetensors"))


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_run_against_the_server_trains_the_student_the_local_teacher_trains(
    teacher_dir, tmp_path, prefetch
):
    local = tmp_path / "local"
    assert main(_args(local, "teacher.train=null", f"teacher.model.pretrained={teacher_dir}")) == 0
    live = _served(teacher_dir)
    try:
        remote = tmp_path / "remote"
        teacher = (
            f"teacher={{source: server, url: '{live.url}', server: {{prefetch: {str(prefetch).lower()}}}}}"
        )
        assert main(_args(remote, teacher)) == 0
    finally:
        live.stop()
    a, b = _student(local), _student(remote)
    # the full vocabulary comes back as float32 log-probabilities: the same softmax up to rounding
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    record = json.loads((remote / "seed-0" / "distilled" / "result.json").read_text())
    calls = record["teacher_server"]
    assert calls["calls"] == 4 and calls["retries"] == 0
    assert calls["prefetch_hits"] == (calls["rows"] if prefetch else 0)


def test_a_top_k_server_trains_with_the_sparse_divergence(teacher_dir, tmp_path):
    live = _served(teacher_dir)
    try:
        out = tmp_path / "topk"
        teacher = f"teacher={{source: server, url: '{live.url}', server: {{top_k: 8}}}}"
        assert main(_args(out, teacher)) == 0
    finally:
        live.stop()
    metrics = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())["metrics"]
    assert metrics["perplexity"] > 1.0


def test_an_unreachable_server_stops_the_run_before_training_naming_the_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "dead"
    teacher = f"teacher={{source: server, url: '{url}', server: {{retries: 1, backoff_s: 0.01}}}}"
    assert main(_args(out, teacher)) == 2
    err = capsys.readouterr().err
    assert url in err
    assert not out.exists()  # nothing trained, nothing left behind


def test_a_server_with_another_vocabulary_is_refused_at_start(tmp_path, capsys):
    bpe = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300, kind="bpe", use_cache=False)
    path = tmp_path / "bpe-teacher"
    torch.manual_seed(0)
    build_causal_lm(CausalLMConfig(hidden_size=16, layers=1, heads=2), len(bpe), bpe).save_pretrained(path)
    bpe.save_pretrained(path)
    live = _served(path)
    try:
        teacher = f"teacher={{source: server, url: '{live.url}'}}"
        assert main(_args(tmp_path / "run", teacher)) == 2
    finally:
        live.stop()
    assert "tokeniz" in capsys.readouterr().err.lower()


def _start_server(path: Path, port: int) -> subprocess.Popen:
    return launch(path, port, threads=1, timeout_s=60)


def test_a_server_killed_mid_run_stops_it_with_a_message_and_an_intact_checkpoint(teacher_dir, tmp_path):
    """`distillery serve-teacher` in its own process, SIGKILLed after the run's second checkpoint: the run
    retries, stops with exit 2 naming the URL and the checkpoint, and resumes once the server is back."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(teacher_dir, port)
    out = tmp_path / "killed"
    teacher = (
        f"teacher={{source: server, url: '{url}', server: {{retries: 2, backoff_s: 0.05, timeout_s: 5}}}}"
    )
    # rows enough that none repeats in 40 steps: every step needs new answers from the server
    args = _args(out, teacher, "train.steps=40", "train.checkpoint_every=2", "train.log_every=1",
                 "data.arithmetic.train=1500", "data.arithmetic.digits=[1, 3]")  # fmt: skip
    script = (
        "import sys, os, signal, pathlib\n"
        "from distillery.cli import main\n"
        "import distillery.train.loop as loop\n"
        "fit = loop.fit\n"
        "def fit_and_kill(*a, **k):\n"
        "    def on_step(step):\n"
        f"        if step == 4: os.kill({server.pid}, signal.SIGKILL)\n"
        "    return fit(*a, **{**k, 'on_step': on_step})\n"
        "import distillery.experiment.runner as runner\n"
        "runner.fit = fit_and_kill\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    finally:
        server.kill()
        server.wait()
    assert done.returncode == 2, done.stderr[-3000:]
    assert url in done.stderr and "checkpoint" in done.stderr
    checkpoints = sorted((out / "seed-0" / "distilled" / "checkpoints").glob("step-*"))
    assert checkpoints, "the checkpoints written before the server died are kept"
    # the server is back: --resume continues from the checkpoint and finishes
    server = _start_server(teacher_dir, port)
    try:
        assert main([*args, "--resume"]) == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    assert (out / "seed-0" / "distilled" / "model" / "model.safetensors").is_file()


class _Misbehaving:
    """Middleware over the reference app: after ``good`` completions it hangs, is slow, or answers garbage."""

    def __init__(self, mode: str, good: int) -> None:
        self.mode, self.good, self.seen = mode, good, 0

    async def __call__(self, request, call_next):
        import asyncio

        from starlette.responses import JSONResponse

        if request.url.path != "/v1/completions":
            return await call_next(request)
        self.seen += 1
        if self.seen <= self.good:
            return await call_next(request)
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "delayed":
            await asyncio.sleep(0.3)
            return await call_next(request)
        response = await call_next(request)
        body = b"".join([chunk async for chunk in response.body_iterator])
        data = json.loads(body)
        entry = data["choices"][0]["prompt_logprobs"][1]
        first = next(iter(entry))
        entry[first]["logprob"] = "NaN" if self.mode == "garbage" else entry[first]["logprob"]
        return JSONResponse(data)


@pytest.mark.parametrize("mode", ["hang", "garbage", "delayed"])
def test_a_server_that_hangs_or_answers_garbage_stops_the_run_and_a_late_one_does_not(
    teacher_dir, tmp_path, mode
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    app = create_app(model, AutoTokenizer.from_pretrained(teacher_dir), model_name="tiny-teacher")
    app.middleware("http")(_Misbehaving(mode, good=6))
    live = LiveServer(app)
    out = tmp_path / mode
    server = "{retries: 1, backoff_s: 0.01, timeout_s: 1.5, batch_rows: 32, prefetch: false}"
    args = _args(out, f"teacher={{source: server, url: '{live.url}', server: {server}}}", "train.steps=10",
                 "train.checkpoint_every=2", "train.keep_checkpoints=5", "data.arithmetic.train=1500",
                 "data.arithmetic.digits=[1, 3]")  # fmt: skip
    try:
        code = main(args)
    finally:
        live.stop()
    local = tmp_path / "local"
    assert main([*[a for a in args if not a.startswith(("teacher=", "output.dir="))], "teacher.train=null",
                 f"teacher.model.pretrained={teacher_dir}", f"output.dir={local}"]) == 0  # fmt: skip
    if mode == "delayed":  # within the timeout: the run is the local one
        assert code == 0
        a, b = _student(out), _student(local)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
        return
    assert code == 2
    checkpoints = sorted((out / "seed-0" / "distilled" / "checkpoints").glob("step-*"))
    # 6 good answers: steps 1-6, then nothing (the step that got no answer changed no weight)
    assert checkpoints[-1].name == "step-00000006"
    # the checkpoint holds exactly the local teacher's training up to its step: nothing malformed got in
    saved = load_file(str(checkpoints[-1] / "model.safetensors"))
    reference = load_file(
        str(local / "seed-0" / "distilled" / "checkpoints" / "step-00000006" / "model.safetensors")
    )
    assert max((saved[k] - reference[k]).abs().max().item() for k in saved) < 1e-4
