"""A teacher language model behind an HTTP server: the prompt log-probabilities of vLLM's OpenAI-compatible
completions API.

A teacher too large for the training machine runs on its own server (vLLM, or the reference server of
:mod:`distillery.serving`); the student's token rows are sent to it and its top-k log-probabilities at
every token come back. The request is vLLM's ``POST /v1/completions`` with ``prompt`` a list of token-id
lists (ids are not re-tokenized), ``max_tokens: 1`` (one generated token, which is ignored) and
``prompt_logprobs: k`` (a vLLM extension). Each choice's ``prompt_logprobs`` has one entry per prompt
token: ``null`` for the first, then a dict from the token id (as a string) to ``{"logprob", "rank",
"decoded_token"}`` holding the k most likely ids and the prompt token itself (k or k + 1 items).

**Positions.** vLLM's entry t (t >= 1) is the teacher's distribution over token t given the tokens
before it. The student's logit at position t predicts token t + 1 (:class:`~distillery.models.hf.
HFCausalLMAdapter` shifts by one), so student position t takes entry t + 1: a row of n tokens gives n - 1
positions 0..n-2, and entry 0 is dropped.

**What is refused.** Nothing the server answers is trained on unchecked: every answer must have one
choice per row sent, one entry per token, at least k entries per token, the prompt token among them,
ids inside the student's vocabulary, finite log-probabilities <= 0 whose probabilities sum to at most 1.
An answer that is not JSON or fails a check is treated like an HTTP 5xx (a proxy's error page or a
truncated body can be transient): retried up to ``retries`` times, then a :class:`ServerError` that
quotes what was wrong. Connection errors, timeouts, HTTP 408, 429 and 5xx are retried with exponential
backoff; any other 4xx is a :class:`ServerError` at once, with the server's message.

**Temperature.** vLLM's prompt log-probabilities are those of the raw logits (temperature 1), so the
sparse features here are at temperature 1 (a top-k cache written at ``temperature: 1``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from distillery.errors import TeacherUnavailableError
from distillery.fileio import first_line
from distillery.functional import tail_from_topk_logp
from distillery.models.adapters import TEACHER_IDS, TEACHER_LOGP, TEACHER_TAIL
from distillery.teachers.base import BaseTeacher, TeacherOutput

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
RowLogprobs = tuple[Tensor, Tensor]  # (ids int64 [n-1, k], logp float32 [n-1, k]) of a row of n tokens

DEFAULT_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{} naïve café"
# Statuses worth asking again: the request timed out, too many requests, or the server failed.
_RETRY_STATUS = {408, 429}
_MAX_BACKOFF_S = 30.0
# Rounding slack of the server's float32 log-probabilities: a log-probability above this, or
# probabilities summing above 1 + this, are not log-probabilities.
_LOGP_SLACK = 1e-3
# The server gives no tail mass; 1 - sum_j p_j of its top-k probabilities has lost its digits below
# about 1e-7. It is floored here so that reverse KL and JSD stay finite (a zero teacher tail beside a
# student that puts mass there is an infinite reverse KL, see functional.topk_tail_divergence).
_TAIL_FLOOR = 1e-6


class ServerError(TeacherUnavailableError):
    """The teacher server cannot be reached, refuses a request, or answers something that cannot be
    trained on; the message names the server's URL and what to do."""


class _Garbage(Exception):
    """An answer that is not what the API promises (retried like a 5xx, then a ServerError)."""


class TeacherClient:
    """A client of the teacher server: the top-k log-probabilities of the teacher at every token of rows.

    Rows are sent ``batch_rows`` to a request, at most ``max_concurrency`` requests at a time (a thread
    pool; :meth:`submit` returns at once, so requests for later batches run while the student trains).
    Each request has a timeout of ``timeout_s`` and is retried up to ``retries`` times after
    ``backoff_s``, ``2 * backoff_s``, ... (at most 30 s) on connection errors, timeouts, HTTP 408, 429,
    5xx and answers that fail the checks of the module docstring.

    Args:
        url: the server, e.g. ``http://host:8000`` (a trailing ``/v1``, the OpenAI base URL, is
            accepted); the endpoints are ``/v1/models``, ``/v1/completions`` and ``/tokenize``.
        top_k: k, the log-probabilities per token (a real vLLM returns at most its ``--max-logprobs``,
            default 20; start it with a larger value for a larger k).
        vocab_size: the student's vocabulary: ids the server returns must lie in ``[0, vocab_size)``.
        model: the served model's name; None asks ``GET /v1/models`` (which must list exactly one).
        token: sent as ``Authorization: Bearer <token>`` (vLLM's ``--api-key``).
        timeout_s: seconds a request may take before it counts as failed.
        retries: further tries of a failed request.
        backoff_s: the wait before the first retry; doubled for each further one.
        max_concurrency: requests in flight at once.
        batch_rows: rows per request (vLLM answers a list of prompts in one request).
        transport: an ``httpx`` transport (a proxy, or a mock in tests); default a plain connection.
    """

    def __init__(
        self,
        url: str,
        *,
        top_k: int,
        vocab_size: int,
        model: str | None = None,
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_concurrency: int = 4,
        batch_rows: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError:
            raise ServerError(
                "a teacher behind a server needs httpx: pip install 'distillery[serve]'"
            ) from None
        for name, value, low in (
            ("vocab_size", vocab_size, 1),
            ("top_k", top_k, 1),
            ("retries", retries, 0),
            ("max_concurrency", max_concurrency, 1),
            ("batch_rows", batch_rows, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if top_k > vocab_size:
            raise ValueError(f"top_k={top_k} exceeds vocab_size={vocab_size}")
        if not timeout_s > 0 or not backoff_s >= 0:
            raise ValueError(f"timeout_s must be > 0 and backoff_s >= 0; got {timeout_s!r}, {backoff_s!r}")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.top_k, self.vocab_size = top_k, vocab_size
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.batch_rows = batch_rows
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(timeout=self.timeout_s, headers=headers, transport=transport)
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="teacher-server")
        self._model = model
        self._lock = threading.Lock()
        self._counts = {"requests": 0.0, "retries": 0.0, "request_s": 0.0}

    @property
    def model(self) -> str:
        """The served model's name: the one given, else the only one ``GET /v1/models`` lists."""
        if self._model is None:
            names = self.models()
            if len(names) != 1:
                listed = ", ".join(map(repr, names)) or "none"
                raise ServerError(
                    f"the teacher server at {self.url} serves {len(names)} models ({listed}); name the one to "
                    "distil from (model=...)"
                )
            self._model = names[0]
        return self._model

    def models(self) -> list[str]:
        """The names of the models the server serves (``GET /v1/models``: ``data[i].id``)."""
        return self._request("GET", "/v1/models", None, _model_names)

    def check_tokenizer(
        self, tokenizer: Any, probe: str = DEFAULT_PROBE, *, add_special_tokens: bool = False
    ) -> None:
        """Refuse a server whose tokenizer differs from the student's.

        The student's token ids are sent as they are: if the server's vocabulary maps them to other
        tokens, its log-probabilities are of other text, and nothing in them looks wrong. So ``probe``
        is tokenized by the server (``POST /tokenize`` with ``prompt`` and ``add_special_tokens``) and by
        ``tokenizer`` (the student's, a Hugging Face tokenizer), and the ids must be equal.

        Raises:
            ServerError: the ids differ (naming the first difference), or the server cannot be asked.
        """
        body = {"model": self.model, "prompt": probe, "add_special_tokens": add_special_tokens}
        server = self._request("POST", "/tokenize", body, _token_ids)
        local = [int(i) for i in tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]]
        if server != local:
            at = next(
                (i for i, (a, b) in enumerate(zip(server, local)) if a != b), min(len(server), len(local))
            )
            raise ServerError(
                f"the teacher server at {self.url} tokenizes differently from the student's tokenizer: {probe!r} "
                f"is {len(server)} ids there and {len(local)} here, first differing at token {at} "
                f"({server[at : at + 5]} there, {local[at : at + 5]} here). The student's token ids would mean "
                "other tokens to the teacher: serve the teacher with the student's tokenizer (vLLM: --tokenizer "
                "<the student's tokenizer directory>), or distil across tokenizers (teacher.tokenizer)"
            )

    def submit(self, rows: Sequence[Sequence[int]]) -> PendingRows:
        """Start the requests for ``rows`` (token-id lists) and return at once; see :meth:`prompt_logprobs`."""
        rows = [list(map(int, r)) for r in rows]
        # The model's name is resolved here (once, maybe by a request), not in the pool's threads.
        model = self.model if any(len(r) > 1 for r in rows) else ""
        chunks = [rows[i : i + self.batch_rows] for i in range(0, len(rows), self.batch_rows)]
        return PendingRows([self.pool.submit(self._completions, model, c) for c in chunks], self.batch_rows)

    def prompt_logprobs(self, rows: Sequence[Sequence[int]]) -> list[RowLogprobs]:
        """The teacher's top-k at every student position of each row.

        Returns:
            per row of n tokens, ``(ids int64 [n-1, k], logp float32 [n-1, k])``: at position t the k
            most likely ids for token t + 1 (vLLM's entry t + 1) in descending order of log-probability,
            and their log-probabilities. A row of fewer than 2 tokens has no position and is not sent.

        Raises:
            ServerError: the server cannot be reached, refuses, or answers garbage after the retries.
        """
        return self.submit(rows).result()

    def metrics(self) -> dict[str, float]:
        """``requests`` (HTTP requests sent, retries included), ``retries`` and ``request_s`` (seconds
        the requests took, summed over the threads)."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Stop the thread pool (requests not started are dropped) and close the connections."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _completions(self, model: str, rows: list[list[int]]) -> list[RowLogprobs]:
        sent = [r for r in rows if len(r) > 1]
        answers = iter([])
        if sent:
            body = {"model": model, "prompt": sent, "max_tokens": 1, "prompt_logprobs": self.top_k}
            answers = iter(
                self._request("POST", "/v1/completions", body, lambda data: self._parse(data, sent))
            )
        empty = (torch.zeros(0, self.top_k, dtype=torch.long), torch.zeros(0, self.top_k))
        return [next(answers) if len(r) > 1 else empty for r in rows]

    def _parse(self, data: Any, rows: list[list[int]]) -> list[RowLogprobs]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _Garbage(f"no list of choices in the answer (keys: {_keys(data)})")
        if len(choices) != len(rows):
            raise _Garbage(f"{len(choices)} choices for {len(rows)} prompts")
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
            if [c["index"] for c in choices] != list(range(len(rows))):
                raise _Garbage(f"choice indices {[c['index'] for c in choices]} are not 0..{len(rows) - 1}")
        return [
            self._parse_row(c.get("prompt_logprobs"), row, i) for i, (c, row) in enumerate(zip(choices, rows))
        ]

    def _parse_row(self, entries: Any, row: list[int], i: int) -> RowLogprobs:
        k, vocab = self.top_k, self.vocab_size
        if not isinstance(entries, list):
            raise _Garbage(
                f"choice {i} has no list prompt_logprobs (got {type(entries).__name__}); is the server vLLM's "
                "OpenAI-compatible API, which returns prompt_logprobs when asked?"
            )
        if len(entries) != len(row):
            raise _Garbage(
                f"choice {i} has {len(entries)} prompt_logprobs entries for a prompt of {len(row)} tokens"
            )
        ids, logps = [], []
        for t in range(1, len(row)):
            entry, where = entries[t], f"choice {i}, token {t}"
            if not isinstance(entry, dict) or len(entry) < k:
                size = len(entry) if isinstance(entry, dict) else type(entry).__name__
                raise _Garbage(f"{where}: {size} log-probabilities, fewer than top_k={k}")
            found = []
            for key, value in entry.items():
                try:
                    token = int(key)
                except ValueError:
                    raise _Garbage(f"{where}: {key!r} is not a token id") from None
                if not 0 <= token < vocab:
                    raise _Garbage(f"{where}: token id {token} outside the student's vocabulary [0, {vocab})")
                logp = value.get("logprob") if isinstance(value, dict) else None
                if isinstance(logp, bool) or not isinstance(logp, (int, float)) or not math.isfinite(logp):
                    raise _Garbage(
                        f"{where}: the log-probability of id {token} is {logp!r}, not a finite number"
                    )
                if logp > _LOGP_SLACK:
                    raise _Garbage(f"{where}: the log-probability of id {token} is {logp} > 0")
                rank = value.get("rank")
                found.append((-float(logp), rank if isinstance(rank, int) else math.inf, token))
            tokens = {token for _, _, token in found}
            if len(tokens) < len(found):
                raise _Garbage(f"{where}: a token id appears twice among the entries")
            if row[t] not in tokens:
                raise _Garbage(
                    f"{where}: the prompt token {row[t]} is not among the entries: misaligned answer"
                )
            mass = math.fsum(math.exp(-neg) for neg, _, _ in found)
            if mass > 1 + _LOGP_SLACK:
                raise _Garbage(f"{where}: the probabilities sum to {mass:.4f} > 1: not log-probabilities")
            if k == vocab and mass < 1 - _LOGP_SLACK:
                raise _Garbage(
                    f"{where}: the {vocab} ids hold a probability of {mass:.4f}, not 1: the server's vocabulary "
                    "is larger than the student's"
                )
            top = sorted(found)[:k]  # by descending log-probability, ties by rank
            ids.append([token for _, _, token in top])
            logps.append([-neg for neg, _, _ in top])
        return torch.tensor(ids, dtype=torch.long).reshape(-1, k), torch.tensor(logps).reshape(-1, k)

    def _count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._counts[name] += value

    def _request(self, method: str, path: str, body: dict | None, parse: Callable[[Any], T]) -> T:
        """``parse`` of the JSON answer to ``method path``, with the retries of the class docstring."""
        import httpx

        url, started, problem, kind = self.url + path, time.perf_counter(), "", ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            self._count("requests")
            sent = time.perf_counter()
            try:
                response = self.http.request(method, url, json=body)
            except httpx.TimeoutException:
                problem, kind = f"no answer within timeout_s={self.timeout_s:g} s", "timeout"
                continue
            except httpx.TransportError as exc:
                problem, kind = f"{type(exc).__name__}: {first_line(exc)}", "connect"
                continue
            finally:
                self._count("request_s", time.perf_counter() - sent)
            status = response.status_code
            if status in _RETRY_STATUS or status >= 500:
                problem, kind = f"HTTP {status}: {_server_message(response)}", "status"
                continue
            if status >= 400:
                raise ServerError(self._refused(path, status, _server_message(response)))
            try:
                return parse(response.json())
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem, kind = f"not JSON: {response.text[:200]!r}", "garbage"
            except _Garbage as exc:
                problem, kind = str(exc), "garbage"
        tries = f"{self.retries + 1} tries over {time.perf_counter() - started:.1f} s"
        if kind == "connect":
            raise ServerError(
                f"the teacher server at {self.url} cannot be reached ({problem}; {tries}). Check that it is running "
                f"and that this machine can reach it (curl {self.url}/v1/models); raise retries or backoff_s to "
                "wait longer for a server that is still starting"
            )
        if kind == "timeout":
            raise ServerError(
                f"the teacher server at {self.url} did not answer {method} {path}: {problem} ({tries}). It may be "
                f"overloaded or stuck: check its log, send fewer rows per request (batch_rows={self.batch_rows}) "
                "or raise timeout_s"
            )
        if kind == "status":
            raise ServerError(
                f"the teacher server at {self.url} failed on {method} {path}: {problem} ({tries}); check its log"
            )
        raise ServerError(
            f"the teacher server at {self.url} answered {method} {path} with something that cannot be trained on: "
            f"{problem} ({tries}). Is it vLLM's OpenAI-compatible API, serving a model of the student's "
            f"vocabulary (vocab_size={self.vocab_size})?"
        )

    def _refused(self, path: str, status: int, message: str) -> str:
        head = f"the teacher server at {self.url} refused {path} with HTTP {status}: {message}"
        if status in (401, 403):
            return f"{head}. It needs a bearer token (vLLM's --api-key): pass the right token=..."
        if status == 404:
            return (
                f"{head}. Check that {self.url} is vLLM's OpenAI-compatible API (vllm serve ...) and that it serves "
                f"the model named (GET {self.url}/v1/models)"
            )
        if "logprob" in message.lower():
            return (
                f"{head}. vLLM returns at most --max-logprobs log-probabilities per token (default 20): restart "
                f"it with --max-logprobs {self.top_k} or more, or lower top_k"
            )
        return head


class PendingRows:
    """The answer to :meth:`TeacherClient.submit`: one future per request of ``batch_rows`` rows."""

    def __init__(self, futures: list[Future], batch_rows: int) -> None:
        self.futures, self.batch_rows = futures, batch_rows

    def row(self, i: int) -> RowLogprobs:
        """Row ``i``'s answer, waiting for its request; raises the request's :class:`ServerError`."""
        return self.futures[i // self.batch_rows].result()[i % self.batch_rows]

    def result(self) -> list[RowLogprobs]:
        """Every row's answer, in order."""
        return [row for future in self.futures for row in future.result()]


def _keys(data: Any) -> str:
    return ", ".join(map(str, list(data)[:8])) if isinstance(data, dict) else type(data).__name__


def _model_names(data: Any) -> list[str]:
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in models
    ):
        raise _Garbage(f"no list of models with an id in the answer (keys: {_keys(data)})")
    return [m["id"] for m in models]


def _token_ids(data: Any) -> list[int]:
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise _Garbage(f"no list of token ids in the answer (keys: {_keys(data)})")
    return tokens


def _server_message(response: httpx.Response) -> str:
    """The error message of an answer: vLLM's ``{"error": {"message"}}``, ``{"error": "..."}`` (its
    authentication), FastAPI's ``{"detail"}``, or the start of the body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for value in (error, data.get("detail"), data.get("message")):
            if value is not None:
                return str(value)[:300]
    return json.dumps(data)[:300]


class ServerTeacher(BaseTeacher):
    """A language-model teacher on a server (:class:`TeacherClient`), in the format of the output caches.

    For LM batches (``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` with right padding): each
    row's unpadded tokens are sent, and the output is aligned with the student's logit positions
    ``[B, L-1]`` (position t predicts token t + 1):

    * ``top_k < vocab_size``: no logits; the features ``TEACHER_IDS`` (int64 ``[B, L-1, k]``),
      ``TEACHER_LOGP`` (float32 ``[B, L-1, k]``) and ``TEACHER_TAIL`` (float32 ``[B, L-1]``, the mass
      ``1 - sum_j p_j`` outside the top-k, floored at 1e-6) of a top-k cache at temperature 1
      (:class:`~distillery.teachers.cached.OutputCacheTeacher`), which the sparse loss terms read;
    * ``top_k == vocab_size``: the full distribution as ``logits`` ``[B, L-1, V]`` (the log-probabilities,
      which a dense term's softmax gives back exactly), as a local teacher's would be.

    Padding positions hold a uniform distribution (ids ``0..k-1``): finite and valid, and masked out by
    the losses (their labels are -100).

    :meth:`prefetch` starts the requests for batches the loop will serve later, so that the server's
    latency overlaps training; a batch whose rows were prefetched takes their answers (matched by the
    rows' token content), others are requested when called. At most ``max_prefetched_rows`` rows wait;
    older ones are dropped (their requests still complete, only the answers are discarded). Stateless:
    ``state_dict()`` is empty.

    Args:
        client: the server's client (its ``top_k``, ``vocab_size`` and retries).
        max_prefetched_rows: the most prefetched rows kept waiting for their batch.
        prefetch: False: :meth:`prefetch` does nothing (for measuring what it buys).
    """

    fsdp = "ok"  # see BaseTeacher

    def __init__(
        self, client: TeacherClient, *, max_prefetched_rows: int = 4096, prefetch: bool = True
    ) -> None:
        self.client = client
        self.max_prefetched_rows = max_prefetched_rows
        self.prefetching = prefetch
        # row content -> [pending request, index in it, rows of prefetched batches still to serve]
        self._prefetched: OrderedDict[bytes, list] = OrderedDict()
        self._counts = {
            "calls": 0.0,
            "rows": 0.0,
            "prefetch_hits": 0.0,
            "prefetch_dropped": 0.0,
            "wait_s": 0.0,
        }

    @property
    def dense(self) -> bool:
        """Whether the output is the full distribution (``top_k == vocab_size``) rather than top-k features."""
        return self.client.top_k == self.client.vocab_size

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        rows, keys = _rows(batch)
        started = time.perf_counter()
        handles: list[tuple[PendingRows, int] | None] = [self._take(key) for key in keys]
        missing = [b for b, h in enumerate(handles) if h is None]
        if missing:
            pending = self.client.submit([rows[b] for b in missing])
            for j, b in enumerate(missing):
                handles[b] = (pending, j)
        answers = [pending.row(i) for pending, i in handles]
        self._counts["wait_s"] += time.perf_counter() - started
        self._counts["calls"] += 1
        self._counts["rows"] += len(rows)
        self._counts["prefetch_hits"] += len(rows) - len(missing)
        return self._output(batch["input_ids"], rows, answers)

    def prefetch(self, batches: Sequence[Mapping[str, Tensor]]) -> None:
        """Start the requests for ``batches`` now; :meth:`__call__` on them then takes the answers. Does
        nothing when the teacher was made with ``prefetch=False`` (every batch asked when it is needed)."""
        if not self.prefetching:
            return
        new: dict[bytes, list] = {}  # row content -> [row, uses]
        for batch in batches:
            for row, key in zip(*_rows(batch)):
                if key in self._prefetched:
                    self._prefetched[key][2] += 1
                else:
                    new.setdefault(key, [row, 0])[1] += 1
        if new:
            pending = self.client.submit([row for row, _ in new.values()])
            for i, (key, (_, uses)) in enumerate(new.items()):
                self._prefetched[key] = [pending, i, uses]
        while len(self._prefetched) > self.max_prefetched_rows:
            self._prefetched.popitem(last=False)
            self._counts["prefetch_dropped"] += 1

    def metrics(self) -> dict[str, float]:
        """``calls``, ``rows`` served, ``prefetch_hits`` (rows answered by a prefetch), ``prefetch_dropped``,
        ``wait_s`` (seconds the calls waited for the server), and the client's ``requests``, ``retries``
        and ``request_s``."""
        return {**self._counts, **self.client.metrics()}

    def close(self) -> None:
        """Close the client; prefetched answers are dropped."""
        self._prefetched.clear()
        self.client.close()

    def _take(self, key: bytes) -> tuple[PendingRows, int] | None:
        entry = self._prefetched.get(key)
        if entry is None:
            return None
        entry[2] -= 1
        if entry[2] <= 0:
            del self._prefetched[key]
        return entry[0], entry[1]

    def _output(self, input_ids: Tensor, rows: list[list[int]], answers: list[RowLogprobs]) -> TeacherOutput:
        k, vocab = self.client.top_k, self.client.vocab_size
        batch, positions = input_ids.shape[0], max(input_ids.shape[1] - 1, 0)
        device = input_ids.device
        if self.dense:
            logits = torch.full((batch, positions, vocab), -math.log(vocab))
            for b, (ids, logp) in enumerate(answers):
                logits[b, : len(ids)].scatter_(-1, ids, logp)
            return TeacherOutput(logits=logits.to(device))
        ids = torch.arange(k).expand(batch, positions, k).clone()
        logp = torch.full((batch, positions, k), -math.log(k))
        for b, (row_ids, row_logp) in enumerate(answers):
            ids[b, : len(row_ids)], logp[b, : len(row_logp)] = row_ids, row_logp
        features = {
            TEACHER_IDS: ids,
            TEACHER_LOGP: logp,
            TEACHER_TAIL: tail_from_topk_logp(logp, _TAIL_FLOOR),
        }
        return TeacherOutput(logits=None, features={name: x.to(device) for name, x in features.items()})


def _rows(batch: Mapping[str, Tensor]) -> tuple[list[list[int]], list[bytes]]:
    """The unpadded token rows of an LM batch and their keys (the int64 bytes of each row)."""
    input_ids = batch["input_ids"].detach().cpu().long()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; input_ids {tuple(input_ids.shape)}")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "ServerTeacher needs right-padded rows (attention_mask 1...1 0...0): a row has a token after padding. "
            "Pad on the right (tokenizer.padding_side = 'right'), as distillery's collators do"
        )
    lengths = mask.sum(-1).tolist()
    rows = [input_ids[b, :n] for b, n in enumerate(lengths)]
    return [r.tolist() for r in rows], [r.numpy().tobytes() for r in rows]
