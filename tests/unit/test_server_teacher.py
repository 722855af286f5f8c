"""A teacher LM behind an HTTP server: the reference server (vLLM's completions API subset) and
ServerTeacher, its client, checked against the local model; retries, timeouts, garbage, tokens."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")

from distillery import functional as DF  # noqa: E402
from distillery.data.text.tokenizer import SPECIAL_TOKENS, wrap_tokenizer  # noqa: E402
from distillery.errors import ConfigError  # noqa: E402
from distillery.models.adapters import TEACHER_IDS, TEACHER_LOGP, TEACHER_TAIL  # noqa: E402
from distillery.serving import create_app, serve  # noqa: E402
from distillery.teachers.server import ServerError, ServerTeacher, TeacherClient  # noqa: E402

VOCAB = 64
SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345678"  # 61 + 3 specials = 64 ids


def char_tokenizer(symbols: str = SYMBOLS):
    """One id per character (ids 0-2 the specials), so that the tokenizer fits the model's 64 ids."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(symbols)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return wrap_tokenizer(tok)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


class LiveServer:
    """An app under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class Recorder(httpx.BaseTransport):
    """A real connection that records every request body, answering the first ones with ``fail``."""

    def __init__(self, fail: list[int] | None = None) -> None:
        self.inner, self.fail, self.bodies = httpx.HTTPTransport(), list(fail or []), []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content) if request.content else None)
        if self.fail:
            return httpx.Response(self.fail.pop(0), json={"error": {"message": "try later", "code": 503}})
        return self.inner.handle_request(request)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, char_tokenizer(), model_name="tiny"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded():
    live = LiveServer(create_app(tiny_llama(), char_tokenizer(), model_name="tiny", token="s3cret"))
    yield live
    live.stop()


def client(url: str, k: int, **kwargs) -> TeacherClient:
    return TeacherClient(url, top_k=k, vocab_size=VOCAB, **{"backoff_s": 0.01, **kwargs})


def lm_batch(lengths: list[int], length: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    width = length or max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    return {"input_ids": ids * mask, "attention_mask": mask.long(), "labels": labels}


def local_logp(model, row: torch.Tensor) -> torch.Tensor:
    """``[n-1, V]`` the local model's log-probabilities at the student's positions of one unpadded row."""
    with torch.no_grad():
        return model(input_ids=row.unsqueeze(0)).logits[0, :-1].float().log_softmax(-1)


def test_the_full_vocabulary_gives_the_local_models_distribution_and_the_same_kd_loss(model, server):
    batch = lm_batch([12, 12])
    with client(server.url, VOCAB) as c:
        out = ServerTeacher(c)(batch)
    assert out.features == {} and out.logits.shape == (2, 11, VOCAB) and out.logits.dtype == torch.float32
    for b in range(2):
        torch.testing.assert_close(out.logits[b], local_logp(model, batch["input_ids"][b]), atol=1e-5, rtol=0)
    with torch.no_grad():
        local = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1]
    student = torch.randn(2, 11, VOCAB)
    assert torch.allclose(DF.forward_kl(student, out.logits), DF.forward_kl(student, local), atol=1e-6)


def test_top_k_features_are_torch_topk_with_the_tail_of_the_cache(model, server):
    batch = lm_batch([10])
    with client(server.url, 5) as c:
        out = ServerTeacher(c)(batch)
    assert out.logits is None and set(out.features) == {TEACHER_IDS, TEACHER_LOGP, TEACHER_TAIL}
    logp = local_logp(model, batch["input_ids"][0])
    top, ids = logp.topk(5, dim=-1)
    assert torch.equal(out.features[TEACHER_IDS][0], ids)
    torch.testing.assert_close(out.features[TEACHER_LOGP][0], top, atol=1e-5, rtol=0)
    _, _, tail = DF.topk_tail(logp, 5)  # what a top-k cache stores
    torch.testing.assert_close(out.features[TEACHER_TAIL][0], tail, atol=1e-5, rtol=0)
    student = torch.randn(1, 9, VOCAB)
    f = out.features
    loss = DF.topk_tail_divergence(
        student, f[TEACHER_IDS], f[TEACHER_LOGP], f[TEACHER_TAIL], divergence="reverse_kl"
    )
    assert torch.isclose(
        loss, DF.topk_tail_divergence(student, ids[None], top[None], tail[None], divergence="reverse_kl")
    )


def test_padded_rows_send_only_their_tokens_and_pad_with_a_valid_distribution(model, server):
    batch = lm_batch([9, 4, 1], length=9)
    recorder = Recorder()
    with client(server.url, 3, transport=recorder) as c:
        out = ServerTeacher(c)(batch)
    (body,) = [b for b in recorder.bodies if b and "prompt" in b]
    assert [len(p) for p in body["prompt"]] == [9, 4]  # the 1-token row has no position: not sent
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 3
    ids, logp = out.features[TEACHER_IDS], out.features[TEACHER_LOGP]
    assert ids.shape == (3, 8, 3)
    top, top_ids = local_logp(model, batch["input_ids"][1, :4]).topk(3, dim=-1)
    assert torch.equal(ids[1, :3], top_ids)
    torch.testing.assert_close(logp[1, :3], top, atol=1e-5, rtol=0)
    assert torch.equal(ids[1, 3:], torch.arange(3).expand(5, 3)) and torch.equal(
        ids[2], torch.arange(3).expand(8, 3)
    )
    assert torch.allclose(logp[2], torch.full((8, 3), -math.log(3)))
    mask = batch["labels"][:, 1:] != -100  # the rows the losses see: only the real tokens
    student = torch.randn(3, 8, VOCAB)
    f = out.features
    assert torch.isfinite(DF.topk_tail_divergence(student, ids, logp, f[TEACHER_TAIL], mask=mask))


def test_a_prefetched_batch_is_requested_once_and_gives_the_same_values(server):
    batch = lm_batch([7, 5])
    recorder = Recorder()
    with client(server.url, 4, model="tiny", transport=recorder) as c:
        teacher = ServerTeacher(c)
        teacher.prefetch([batch])
        out = teacher(batch)
        assert len(recorder.bodies) == 1
        assert teacher.metrics()["prefetch_hits"] == 2 and teacher.metrics()["requests"] == 1
        again = teacher(batch)  # the prefetch was used up: asked again
        assert len(recorder.bodies) == 2
    for name in out.features:
        assert torch.equal(out.features[name], again.features[name])
    assert teacher.state_dict() == {}


def test_prefetched_rows_beyond_the_limit_are_dropped(server):
    with client(server.url, 2, model="tiny") as c:
        teacher = ServerTeacher(c, max_prefetched_rows=2)
        teacher.prefetch([lm_batch([5, 6]), lm_batch([7])])
        assert teacher.metrics()["prefetch_dropped"] == 1
        teacher(lm_batch([7]))
        assert teacher.metrics()["prefetch_hits"] == 1


def test_a_dead_server_is_retried_then_an_error_names_its_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there
    with client(url, 2, model="tiny", retries=2) as c:
        with pytest.raises(ServerError, match="cannot be reached") as err:
            c.prompt_logprobs([[3, 4, 5]])
        assert url in str(err.value) and c.metrics()["requests"] == 3 and c.metrics()["retries"] == 2
    assert err.value.exit_code == 2


def test_a_server_that_never_answers_times_out_naming_its_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections complete, nothing ever answers
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with client(url, 2, model="tiny", retries=1, timeout_s=0.2) as c:
            started = time.monotonic()
            with pytest.raises(ServerError, match=r"did not answer .*timeout_s=0.2") as err:
                c.prompt_logprobs([[3, 4, 5]])
            assert url in str(err.value) and c.metrics()["requests"] == 2
            assert time.monotonic() - started < 3
    finally:
        sock.close()


def vllm_answer(rows, k, edit=None):
    """A well-formed vLLM answer (uniform top-k plus the prompt token), then ``edit`` applied to it."""
    choices = []
    for i, row in enumerate(rows):
        entries = [None]
        for t in range(1, len(row)):
            entry = {
                str(j): {"logprob": math.log(0.01), "rank": j + 1, "decoded_token": "x"} for j in range(k)
            }
            entry[str(row[t])] = {"logprob": math.log(0.005), "rank": k + 1, "decoded_token": "y"}
            entries.append(entry)
        choices.append(
            {"index": i, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}
        )
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": choices}
    if edit is not None:
        edit(answer)
    return answer


def mocked(k: int, edit=None, text: str | None = None, status: int = 200):
    """A client whose server answers every request so (counting them)."""
    seen = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if text is not None:
            return httpx.Response(status, text=text)
        answer = vllm_answer(json.loads(request.content)["prompt"], k, edit)
        return httpx.Response(status, text=json.dumps(answer))  # json.dumps writes NaN as vLLM's Python would

    return client(
        "http://teacher.invalid:8000/v1", k, model="m", retries=1, transport=httpx.MockTransport(handle)
    ), seen


def test_a_well_formed_answer_keeps_the_top_k_and_drops_the_extra_prompt_token():
    c, _ = mocked(3)
    ((ids, logp),) = c.prompt_logprobs([[10, 20, 30]])
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]] and torch.allclose(logp, torch.full((2, 3), math.log(0.01)))


def _set(path, value):
    def edit(answer):
        *head, last = path
        node = answer
        for key in head:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "text", "message"),
    [
        (
            _set(["choices", 0, "prompt_logprobs"], [None, {}]),
            None,
            "2 prompt_logprobs entries for a prompt of 3",
        ),
        (lambda a: a["choices"].append(dict(a["choices"][0], index=1)), None, "2 choices for 1 prompts"),
        (_set(["choices", 0, "prompt_logprobs", 1, "99"], {"logprob": -5.0}), None, "token id 99 outside"),
        (_set(["choices", 0, "prompt_logprobs", 2, "1", "logprob"], float("nan")), None, "nan, not a finite"),
        (_set(["choices", 0, "prompt_logprobs", 2, "1", "logprob"], None), None, "None, not a finite"),
        (_set(["choices", 0, "prompt_logprobs", 1], {"20": {"logprob": -1.0}}), None, "fewer than top_k=3"),
        (_set(["choices", 0, "prompt_logprobs", 1, "0", "logprob"], 2.0), None, "2.0 > 0"),
        (lambda a: a["choices"][0]["prompt_logprobs"][1].pop("20"), None, "prompt token 20 is not among"),
        (_set(["choices", 0, "prompt_logprobs", 1, "01"], {"logprob": -9.0}), None, "appears twice"),
        (None, "<html>502 Bad Gateway</html>", "not JSON: '<html>502"),
    ],
)
def test_garbage_answers_are_retried_then_refused_quoting_the_problem(edit, text, message):
    c, seen = mocked(3, edit, text)
    with pytest.raises(ServerError, match="cannot be trained on") as err:
        c.prompt_logprobs([[10, 20, 30]])
    assert message in str(err.value) and "http://teacher.invalid:8000" in str(err.value)
    assert len(seen) == 2  # retries=1


def test_a_4xx_is_refused_at_once_with_the_servers_message():
    c, seen = mocked(
        3, text=json.dumps({"error": {"message": "Requested prompt logprobs of 3 ..."}}), status=400
    )
    with pytest.raises(ServerError, match=r"HTTP 400: Requested prompt logprobs.*--max-logprobs 3"):
        c.prompt_logprobs([[10, 20, 30]])
    assert len(seen) == 1


def test_a_5xx_is_retried_and_the_retry_succeeds(model, server):
    recorder = Recorder(fail=[503, 500])
    with client(server.url, 2, model="tiny", transport=recorder, retries=2) as c:
        ((ids, _),) = c.prompt_logprobs([[5, 6, 7, 8]])
        assert c.metrics()["requests"] == 3 and c.metrics()["retries"] == 2
    assert torch.equal(ids, local_logp(model, torch.tensor([5, 6, 7, 8])).topk(2, dim=-1).indices)


def test_a_token_is_required_when_the_server_has_one(guarded):
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    with client(guarded.url, 2) as c, pytest.raises(ServerError, match="HTTP 401.*bearer token") as err:
        c.models()
    assert c.metrics()["requests"] == 1  # not retried
    assert guarded.url in str(err.value)
    with client(guarded.url, 2, token="s3cret") as c:
        assert c.models() == ["tiny"]
        assert len(c.prompt_logprobs([[3, 4, 5]])[0][0]) == 2


def test_the_tokenizer_check_refuses_a_server_with_another_vocabulary(server):
    with client(server.url, 2) as c:
        c.check_tokenizer(char_tokenizer(), probe="TheQuickBrownFox")
        with pytest.raises(ServerError, match="tokenizes differently.*first differing at token 0"):
            c.check_tokenizer(char_tokenizer(SYMBOLS[::-1]), probe="TheQuickBrownFox")


def test_the_server_answers_in_vllms_format(model, server):
    body = {"prompt": [[3, 4, 5, 6]], "max_tokens": 2, "prompt_logprobs": 2, "echo": True}
    answer = httpx.post(f"{server.url}/v1/completions", json=body).json()
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    entries = choice["prompt_logprobs"]
    assert len(entries) == 4 and entries[0] is None
    logp = local_logp(model, torch.tensor([3, 4, 5, 6]))
    for t in range(1, 4):
        entry = entries[t]
        assert str([3, 4, 5, 6][t]) in entry and len(entry) in (2, 3)
        assert {e["rank"] for i, e in entry.items() if i != str([3, 4, 5, 6][t])} <= {1, 2}
        prompt = entry[str([3, 4, 5, 6][t])]
        assert prompt["rank"] == int((logp[t - 1] > logp[t - 1, [3, 4, 5, 6][t]]).sum()) + 1
        assert math.isclose(prompt["logprob"], float(logp[t - 1, [3, 4, 5, 6][t]]), abs_tol=1e-5)
    assert choice["text"].startswith("abcd")  # echo: ids 3..6 are "a".."d"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "abc", "add_special_tokens": False}).json()
    assert tokens == {"count": 3, "max_model_len": 64, "tokens": [3, 4, 5], "token_strs": None}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": [[3, VOCAB]], "prompt_logprobs": 1})
    assert bad.status_code == 400 and "out of vocabulary" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{server.url}/v1/completions", json={"model": "other", "prompt": [3, 4]})
    assert unknown.status_code == 404


def test_serve_refuses_a_public_host_without_a_token():
    with pytest.raises(ConfigError, match=r"host='0.0.0.0' is not a loopback address and no token"):
        serve("/no/such/model", host="0.0.0.0")
    with pytest.raises(ConfigError, match="no model config found"):  # with a token, it gets as far as loading
        serve("/no/such/model", host="0.0.0.0", token="t")
