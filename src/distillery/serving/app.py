"""The reference teacher server: the subset of vLLM's OpenAI-compatible API that
:class:`~distillery.teachers.server.ServerTeacher` uses, on FastAPI and uvicorn.

It exists so that a teacher can be served without vLLM (a CPU machine, a model vLLM does not run) and
so that the client is tested against a server of the same protocol. The fields are vLLM's:

* ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by",
  "root", "parent", "max_model_len", "permission"}]}``;
* ``POST /v1/completions``: ``prompt`` (a list of token ids, a list of such lists, a string or a list of
  strings), ``model``, ``max_tokens`` (default 16, generated greedily), ``prompt_logprobs`` (k; -1 for the
  whole vocabulary), ``echo``, ``add_special_tokens`` (strings only); the answer ``{"id", "object":
  "text_completion", "created", "model", "choices": [{"index", "text", "logprobs": null, "finish_reason":
  "length", "stop_reason": null, "prompt_logprobs"}], "usage": {"prompt_tokens", "completion_tokens",
  "total_tokens"}}``. ``prompt_logprobs`` has one entry per prompt token: ``null`` for the first, then a
  dict from the id (a string) to ``{"logprob", "rank", "decoded_token"}`` with the prompt token (its rank
  in the whole vocabulary) and the top-k (ranks 1..k), as vLLM's ``append_logprobs_for_next_position``;
  ``-inf`` is sent as -9999.0 (vLLM's ``clamp_prompt_logprobs``). ``logprobs`` of generated tokens are
  not implemented (refused);
* ``POST /tokenize``: ``{"prompt", "add_special_tokens", "return_token_strs"}`` to ``{"count",
  "max_model_len", "tokens", "token_strs"}``.

Errors are vLLM's ``{"error": {"message", "type", "param", "code"}}`` with status 400 (a bad request,
validation included) or 404 (an unknown model). With a ``token``, every request needs ``Authorization:
Bearer <token>`` and is otherwise answered 401 ``{"error": "Unauthorized"}`` (vLLM's ``--api-key``).

The model runs on the CPU in float32 under ``torch.no_grad()``, one request at a time, ``max_batch_rows``
rows to a forward pass (right-padded: a causal LM's positions before the padding are unaffected).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from distillery import functional as DF
from distillery.errors import ConfigError
from distillery.models.hub import from_pretrained

_NEG_INF_LOGPROB = -9999.0  # what vLLM sends for a log-probability of -inf (JSON has no infinity)


class CompletionRequest(BaseModel):
    """The fields of vLLM's ``CompletionRequest`` this server reads; others are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] | str | list[str]
    max_tokens: int = Field(16, ge=1)
    prompt_logprobs: int | None = Field(None, ge=-1)
    logprobs: int | None = None
    echo: bool = False
    add_special_tokens: bool = True


class TokenizeRequest(BaseModel):
    """vLLM's ``TokenizeCompletionRequest``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class _RequestError(Exception):
    """Answered as vLLM's ErrorResponse with this status."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def create_app(
    model: nn.Module, tokenizer: Any, *, model_name: str, token: str | None = None, max_batch_rows: int = 64
):
    """The FastAPI app serving ``model`` (a Hugging Face causal LM) and ``tokenizer`` as ``model_name``.

    Args:
        model: the teacher; moved to the CPU in float32, in eval mode, without gradients.
        tokenizer: its tokenizer (string prompts, ``/tokenize``, the ``decoded_token`` of each entry).
        model_name: the name ``/v1/models`` lists and requests may give as ``model``.
        token: when set, the bearer token every request must carry.
        max_batch_rows: rows per forward pass (a request with more rows is run in parts).
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    model = model.to("cpu").float().eval().requires_grad_(False)
    vocab = int(model.config.vocab_size)
    max_len = int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
    lock = threading.Lock()  # one forward pass at a time: the endpoints run in a thread pool

    @cache
    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id])

    app = FastAPI(title=f"distillery teacher server: {model_name}")

    def error(status: int, message: str, kind: str):
        content = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return JSONResponse(content, status_code=status)

    @app.exception_handler(_RequestError)
    async def request_error(request, exc: _RequestError):
        return error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(400, str(exc.errors()), "BadRequestError")

    @app.middleware("http")
    async def authenticate(request, call_next):
        given = request.headers.get("authorization", "").encode()
        if token is not None and not secrets.compare_digest(given, f"Bearer {token}".encode()):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise _RequestError(404, f"The model `{name}` does not exist.", "NotFoundError")

    @app.get("/v1/models")
    def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "distillery",
            "root": model_name,
            "parent": None,
            "max_model_len": max_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/tokenize")
    def tokenize(request: TokenizeRequest):
        check_model(request.model)
        ids = list(tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
        strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": strs})

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        check_model(request.model)
        if request.logprobs is not None:
            raise _RequestError(
                400, "logprobs of generated tokens are not implemented; ask for prompt_logprobs"
            )
        rows = _prompt_rows(request.prompt, tokenizer, request.add_special_tokens)
        for row in rows:
            if not row:
                raise _RequestError(400, "a prompt is empty")
            if max(row) >= vocab:
                raise _RequestError(400, f"Token id {max(row)} is out of vocabulary (vocab_size={vocab})")
            if len(row) + request.max_tokens > max_len:
                raise _RequestError(
                    400,
                    f"This model's maximum context length is {max_len} tokens. However, you requested "
                    f"{len(row) + request.max_tokens} tokens ({len(row)} in the prompt, {request.max_tokens} "
                    "for the completion).",
                )
        k = request.prompt_logprobs
        if k is not None and k > vocab:
            raise _RequestError(
                400, f"Requested prompt logprobs of {k}, which is greater than max allowed: {vocab}"
            )
        k = vocab if k == -1 else k
        choices = []
        with lock, torch.no_grad():
            for start in range(0, len(rows), max_batch_rows):
                part = rows[start : start + max_batch_rows]
                logits = _forward(model, part)
                for i, row in enumerate(part):
                    z = logits[i, : len(row)]
                    generated = _greedy(model, row, int(z[-1].argmax()), request.max_tokens)
                    text = tokenizer.decode(generated)
                    choices.append(
                        {
                            "index": start + i,
                            "text": tokenizer.decode(row) + text if request.echo else text,
                            "logprobs": None,
                            "finish_reason": "length",
                            "stop_reason": None,
                            "prompt_logprobs": None if k is None else _prompt_logprobs(z, row, k, piece),
                        }
                    )
        prompt_tokens = sum(map(len, rows))
        completion_tokens = len(rows) * request.max_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        response = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage,
        }
        return JSONResponse(response)

    return app


def _prompt_rows(prompt: list | str, tokenizer: Any, add_special_tokens: bool) -> list[list[int]]:
    """The token rows of a request's ``prompt`` (token ids are taken as they are, strings tokenized)."""
    prompts = [prompt] if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else prompt
    return [
        list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        if isinstance(p, str)
        else list(p)
        for p in prompts
    ]


def _forward(model: nn.Module, rows: list[list[int]]) -> Tensor:
    """``[rows, longest, V]`` float32 logits of the right-padded rows."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return model(input_ids=ids, attention_mask=mask).logits.float()


def _greedy(model: nn.Module, row: list[int], first: int, count: int) -> list[int]:
    """``count`` greedily generated tokens after ``row``, the first of which is ``first``."""
    out = [first]
    while len(out) < count:
        logits = model(input_ids=torch.tensor([row + out])).logits
        out.append(int(logits[0, -1].argmax()))
    return out


def _prompt_logprobs(z: Tensor, row: list[int], k: int, piece) -> list[dict[str, dict] | None]:
    """vLLM's ``prompt_logprobs`` of a row from its logits ``z`` ``[n, V]``: entry t (t >= 1) from the
    logits at t - 1, holding the prompt token ``row[t]`` (rank in the whole vocabulary) and the top-k."""
    pred, targets = z[:-1], torch.tensor(row[1:]).unsqueeze(-1)  # position t - 1 predicts token t
    logp = pred.log_softmax(-1)
    target_logp = logp.gather(-1, targets)
    ranks = (logp > target_logp).sum(-1) + 1
    top_ids, top_logp, _ = DF.topk_tail(pred, k) if k > 0 else (None, None, None)

    def item(token_id: int, value: float, rank: int) -> dict[str, Any]:
        return {"logprob": max(value, _NEG_INF_LOGPROB), "rank": rank, "decoded_token": piece(token_id)}

    entries: list[dict[str, dict] | None] = [None]
    for t in range(len(row) - 1):
        entry = {str(row[t + 1]): item(row[t + 1], float(target_logp[t]), int(ranks[t]))}
        if k > 0:
            ids, values = top_ids[t].tolist(), top_logp[t].tolist()
            entry.update({str(i): item(i, v, r + 1) for r, (i, v) in enumerate(zip(ids, values))})
        entries.append(entry)
    return entries


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    model_name: str | None = None,
    *,
    max_batch_rows: int = 64,
) -> None:
    """Serve the causal LM saved in ``model_dir`` (or a hub id) with its tokenizer until interrupted.

    Args:
        model_dir: a directory saved with ``save_pretrained`` (model and tokenizer), or a hub id.
        host, port: where to listen. A host other than a loopback address needs a ``token``.
        token: the bearer token clients must send (the client's ``token``).
        model_name: the name served (default ``model_dir``).
        max_batch_rows: rows per forward pass.

    Raises:
        ConfigError: a non-loopback host without a token, or a model that does not load.
    """
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"serve: host={host!r} is not a loopback address and no token is set, so anyone who can reach this "
            "machine could use the teacher; set a token (clients send it as Authorization: Bearer <token>), or "
            "listen on 127.0.0.1 (and reach it through an SSH tunnel)"
        )
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = from_pretrained(AutoModelForCausalLM.from_pretrained, model_dir, "serve.model_dir")
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_dir, "serve.model_dir", what="tokenizer")
    app = create_app(
        model, tokenizer, model_name=model_name or model_dir, token=token, max_batch_rows=max_batch_rows
    )
    uvicorn.run(app, host=host, port=port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at the moment (for tests and benchmarks)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launch(
    model_dir: str | Path, port: int, *, threads: int | None = None, env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> subprocess.Popen:  # fmt: skip
    """``distillery serve-teacher model_dir --port port`` in a new process, returned once it answers
    ``GET /v1/models`` on 127.0.0.1 (``threads``: its ``OMP_NUM_THREADS``). Stop it with ``terminate()``.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout_s`` (its stderr's end in the message).
    """
    import httpx

    extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillery.cli", "serve-teacher", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {}), **extra},
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve-teacher did not start: {proc.stderr.read().decode()[-2000:]}")
