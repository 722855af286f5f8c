"""Language models on the user's own data: every format end to end through the CLI, chat masking,
every method on prompt data, verifiers, the saved tokenizer, `distillery eval`, and bad input.

Every run is tiny (a 16-wide one-layer Llama, a byte tokenizer, two steps, a few dozen rows), so
each takes a second or two; the whole file stays well within two minutes on one core.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from distillery.cli import main
from distillery.config import load_config
from distillery.data.text import DEFAULT_CHAT_TEMPLATE, TextStream, save_training_tokenizer, train_tokenizer
from distillery.data.text.user import conversation
from distillery.errors import ConfigError
from distillery.experiment import evaluate_run
from distillery.recipes import list_recipes
from distillery.train.batches import BatchPlan

pytestmark = pytest.mark.integration

WORDS = "zero one two three four five six seven eight nine".split()

BASE = """\
task: lm
name: user-lm
seeds: [0]
data:
  name: prompt_completion
  train: {{path: {train}}}
  validation: 4
  test: 4
  tokenizer: {{kind: byte}}
  seq_len: 32
  max_eval_blocks: 4
teacher:
  model: {{hidden_size: 16, layers: 1, heads: 2, max_positions: 64}}
  train: {{steps: 2, batch_size: 4, eval_every: 0}}
student: {{hidden_size: 16, layers: 1, heads: 2, max_positions: 64}}
loss:
  ce: {{weight: 0.5}}
  forward_kl: {{weight: 0.5}}
train: {{steps: 2, batch_size: 4, eval_every: 0}}
baseline: {{enabled: false}}
method: {{max_new_tokens: 4}}
eval: {{max_new_tokens: 4}}
"""


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` keeps Arrow copies of the files it reads: keep them in the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _spell(n: int) -> str:
    return " ".join(WORDS[int(d)] for d in str(n))


def _pairs(n: int = 24) -> list[dict[str, str]]:
    return [
        {"prompt": f"spell {i * 7}:", "completion": " " + _spell(i * 7), "answer": _spell(i * 7)}
        for i in range(n)
    ]


def _chats(n: int = 20) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Spell numbers."},
                {"role": "user", "content": str(i * 3)},
                {"role": "assistant", "content": _spell(i * 3)},
            ]
        }
        for i in range(n)
    ]


def _texts(n: int = 40) -> list[str]:
    return [" ".join(WORDS[(i * k) % 10] for k in range(1, 9)) for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, train: Path, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(train=train))
    return path


def _run(config: Path, out: Path, *overrides: str) -> int:
    return main(["run", str(config), f"output.dir={out}", "--no-progress", *overrides])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _result(out: Path, arm: str = "distilled") -> dict:
    return json.loads((out / "seed-0" / arm / "result.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Every format, end to end
# ----------------------------------------------------------------------------------------------------


def test_prompt_completion_jsonl_trains_saves_a_tokenizer_that_encodes_as_training_and_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.tasks.lm import prepare_data

    train = _jsonl(tmp_path / "train.jsonl", _pairs())
    cfg_path = _config(tmp_path, train)
    out = tmp_path / "run"
    assert _run(cfg_path, out, "baseline.enabled=true") == 0
    summary = _summary(out)
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    assert 0.0 <= summary["models"]["distilled"]["task_accuracy"]["mean"] <= 100.0

    # the saved tokenizer encodes a prompt exactly as the training rows start: [bos] prompt
    model_dir = out / "seed-0" / "distilled" / "model"
    saved = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(load_config(str(cfg_path)))
    first = data["train_examples"][0]
    ids = saved(first.prompt)["input_ids"]
    assert ids[0] == saved.bos_token_id
    assert ids == data["train"].input_ids[0][: len(ids)].tolist()
    assert data["train"].labels[0][: len(ids)].eq(-100).all()  # the prompt is masked
    assert saved.chat_template == DEFAULT_CHAT_TEMPLATE  # messages work offline with the saved model
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([ids])).logits).all()

    # `distillery eval` reloads the students and scores them again on the test split
    before = _result(out)["metrics"]
    assert main(["eval", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())["models"]["distilled"]
    assert again["perplexity"]["mean"] == pytest.approx(before["perplexity"], rel=1e-5)
    assert again["task_accuracy"]["mean"] == pytest.approx(before["task_accuracy"])
    # ... or on another test file (`--data`): every student is scored on its rows
    other = _jsonl(tmp_path / "other.jsonl", _pairs()[:6])
    result = evaluate_run(out, data=other)
    on_other = result.arms["distilled"][0]["metrics"]
    assert on_other["task_accuracy"] in {100.0 * k / 6 for k in range(7)}  # six problems
    assert on_other["perplexity"] != pytest.approx(
        before["perplexity"], rel=1e-6
    )  # other rows, another number


def test_the_saved_tokenizer_adds_bos_only_when_training_did(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer("", kind="byte", use_cache=False)
    for add_bos in (True, False):
        save_training_tokenizer(tok, tmp_path / str(add_bos), add_bos=add_bos)
        saved = AutoTokenizer.from_pretrained(tmp_path / str(add_bos))
        plain = tok("Emma Woodhouse, handsome", add_special_tokens=False)["input_ids"]
        assert saved("Emma Woodhouse, handsome")["input_ids"] == ([1] if add_bos else []) + plain
    assert tok("ab")["input_ids"] == [100, 101]  # the run's own tokenizer is unchanged


@pytest.mark.parametrize("kind", ["csv", "parquet", "disk"])
def test_prompt_completion_from_csv_parquet_and_a_save_to_disk_folder(tmp_path, kind):
    import datasets

    rows = _pairs()
    if kind == "csv":
        path = tmp_path / "train.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["question", "completion", "answer"])
            writer.writeheader()
            writer.writerows(
                {"question": r["prompt"], "completion": r["completion"], "answer": r["answer"]} for r in rows
            )
        extra = ["data.fields.prompt=question"]  # a field of another name
    elif kind == "parquet":
        path = tmp_path / "train.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        extra = ["data.verifier={name: regex, pattern: '([a-z ]+)$', field: answer}"]
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
        extra = ["data.verifier=exact_match"]
    out = tmp_path / "run"
    assert _run(_config(tmp_path, path), out, *extra) == 0
    assert 0.0 <= _result(out)["metrics"]["task_accuracy"] <= 100.0


def test_messages_render_with_the_default_template_and_train(tmp_path):
    train = _jsonl(tmp_path / "chats.jsonl", _chats())
    out = tmp_path / "run"
    assert _run(_config(tmp_path, train), out, "data.name=messages", "data.seq_len=64") == 0
    assert "task_accuracy" in _result(out)["metrics"]
    assert (out / "seed-0" / "distilled" / "model" / "chat_template.jinja").is_file()


def test_plain_text_from_a_txt_file_and_from_a_jsonl_field(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(_texts()) + "\n\n")  # a blank line is skipped
    out = tmp_path / "run"
    assert _run(_config(tmp_path, txt), out, "data.name=text") == 0
    assert "task_accuracy" not in _result(out)["metrics"] and _result(out)["metrics"]["perplexity"] > 1.0
    jsonl = _jsonl(tmp_path / "docs.jsonl", [{"body": t, "id": i} for i, t in enumerate(_texts())])
    out2 = tmp_path / "run2"
    assert _run(_config(tmp_path, jsonl), out2, "data.name=text", "data.fields.text=body",
                "data.validation=0.1", "data.test=0.1") == 0  # fmt: skip


def test_streamed_text_trains_a_fixed_number_of_steps(tmp_path):
    txt = tmp_path / "big.txt"
    txt.write_text("\n".join(_texts(60)) + "\n")
    out = tmp_path / "run"
    args = ["data.name=text", f"data.train={{path: {txt}, streaming: true}}", "data.shuffle_buffer=4",
            "train.steps=3", "baseline.enabled=true"]  # fmt: skip
    assert _run(_config(tmp_path, txt), out, *args) == 0
    record = _result(out)
    assert record["steps"] == 3 and record["train_examples"] == 3 * 4
    assert _result(out, "baseline")["steps"] == 3
    # epochs need the number of blocks, which a stream does not know
    assert _run(_config(tmp_path, txt), tmp_path / "bad", *args, "train.steps=null", "train.epochs=1") == 2
    assert not (tmp_path / "bad").exists()


def test_a_stream_is_read_forwards_cycles_and_resumes_to_the_same_blocks(tmp_path):
    import datasets

    tok = train_tokenizer("", kind="byte", use_cache=False)
    table = datasets.Dataset.from_list([{"text": t} for t in _texts(12)]).to_iterable_dataset()
    stream = TextStream(table, "text", tok, 16, "data.train", shuffle_buffer=3)
    steps, batch = 12, 4
    n = steps * batch
    order = BatchPlan(n, n, 7).indices(0)
    plan = BatchPlan(n, batch, 7)
    view = stream.view(steps, batch, 7, order)
    seen = [view.get_batch(plan.indices(k))["input_ids"] for k in range(steps)]
    passes = -(-n // stream.length)
    assert stream.length is not None and stream.length < n  # the data cycled
    assert view.reader.reads == passes  # forwards only: one read of the stream per pass
    resumed = stream.view(steps, batch, 7, order)
    for k in range(5, steps):  # a resumed run from step 5 reads the same blocks
        assert torch.equal(resumed.get_batch(plan.indices(k))["input_ids"], seen[k])
    every = torch.cat([b[:, :2] for b in seen])  # each block of a pass is served once per pass
    assert len({tuple(r.tolist()) for r in every}) <= stream.length


# ----------------------------------------------------------------------------------------------------
# Chat masking, by hand
# ----------------------------------------------------------------------------------------------------


def _byte_ids(text: str) -> list[int]:
    ids = []
    while text:
        if text.startswith("<eos>"):
            ids.append(2)
            text = text[5:]
            continue
        ids.extend(3 + b for b in text[0].encode())
        text = text[1:]
    return ids


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_chat_masking_keeps_exactly_the_assistant_turns(tmp_path, train_on):
    from distillery.tasks.lm import prepare_data

    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    train = _jsonl(tmp_path / "chats.jsonl", [{"messages": chat}] * 12)
    cfg = load_config(
        str(_config(tmp_path, train)), ["data.name=messages", f"data.train_on={train_on}", "data.seq_len=64"]
    )
    data = prepare_data(cfg)
    ids, labels = data["train"].input_ids[0].tolist(), data["train"].labels[0].tolist()
    # by hand: "system: S\nuser: U1\nassistant: A1<eos>user: U2\nassistant: A2<eos>" after <bos>
    pieces = [("system: S\nuser: U1\nassistant: ", False), ("A1<eos>", train_on == "all"),
              ("user: U2\nassistant: ", False), ("A2<eos>", True)]  # fmt: skip
    want_ids, want_labels = [1], [-100]
    for text, learned in pieces:
        tokens = _byte_ids(text)
        want_ids += tokens
        want_labels += tokens if learned else [-100] * len(tokens)
    assert ids == want_ids and labels == want_labels
    example = data["train_examples"][0]
    assert example.prompt == "system: S\nuser: U1\nassistant: A1<eos>user: U2\nassistant: "
    assert example.reference == "A2"


def test_a_template_that_writes_bos_itself_gets_one_bos():
    def render(msgs, gen):
        text = "<bos>" + "".join(
            f"[{m['role']}] {m['content']}" + ("<eos>" if m["role"] == "assistant" else "\n") for m in msgs
        )
        return text + ("[assistant] " if gen else "")

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = conversation(
        msgs, render, train_on="all", bos_text="<bos>", reference=None, where="data.train", row=0
    )
    assert ex.segments == (("[user] hi\n[assistant] ", False), ("yo<eos>", True))


# ----------------------------------------------------------------------------------------------------
# Every method on prompt data; verifiers
# ----------------------------------------------------------------------------------------------------

CHECKS = """
def right(prompt, response, reference):
    assert prompt.startswith("spell"), prompt
    return 1.0 if response.strip() == reference.strip() else 0.25
"""


@pytest.mark.parametrize(
    "method",
    [
        ["method.name=sequence"],
        ["method.name=on_policy", "method.student_lambda=1.0"],
        ["method.name=speculative", "method.student_lambda=1.0"],
        [
            "method.name=paced",
            "method.paced.from_step=0",
            "method.paced.samples=2",
            "data.verifier=usercheck_mod:right",
        ],
    ],
    ids=["sequence", "on_policy", "speculative", "paced"],
)
def test_every_method_runs_on_prompt_completion_data(tmp_path, monkeypatch, method):
    (tmp_path / "usercheck_mod.py").write_text(CHECKS)
    monkeypatch.chdir(tmp_path)  # the verifier's module is found in the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "usercheck_mod", raising=False)
    train = _jsonl(tmp_path / "train.jsonl", _pairs())
    out = tmp_path / "run"
    assert _run(_config(tmp_path, train), out, *method) == 0
    record = _result(out)
    if "method.name=paced" in method:
        # the user function scores 0.25 for a wrong answer: pass rates are no longer multiples of 1/2
        assert record["sampling"]["mean_pass_rate"] >= 0.25
        assert record["metrics"]["task_accuracy"] >= 25.0
    if "method.name=on_policy" in method or "method.name=speculative" in method:
        assert record["sampling"]["on_policy_fraction"] == 1.0


def test_on_policy_runs_on_chats(tmp_path):
    train = _jsonl(tmp_path / "chats.jsonl", _chats())
    out = tmp_path / "run"
    assert _run(_config(tmp_path, train), out, "data.name=messages", "data.seq_len=64", "method.name=on_policy",
                "method.student_lambda=1.0") == 0  # fmt: skip
    assert _result(out)["sampling"]["on_policy_fraction"] == 1.0


def contains(prompt: str, response: str, reference: str) -> bool:
    """A user verifier (named by its dotted path below)."""
    return reference in response


def test_verifiers_score_as_documented():
    from distillery.data.text.verifiers import (
        ExactMatchVerifier,
        FunctionVerifier,
        RegexVerifier,
        build_verifier,
    )

    exact = build_verifier(ExactMatchVerifier(ignore_case=True), "data.verifier")
    assert exact("q", " Four ", "four") == 1.0 and exact("q", "five", "four") == 0.0
    regex = build_verifier(RegexVerifier(pattern=r"answer: (\d+)"), "data.verifier")
    assert regex("q", "so... answer: 42.", "The answer: 42") == 1.0
    assert regex("q", "42", "42") == 0.0  # no match in the response
    assert (
        build_verifier(RegexVerifier(pattern=r"\d+", reference_pattern=False), "v")("q", "x 7 y", " 7") == 1.0
    )
    fn = build_verifier(
        FunctionVerifier(function="tests.integration.test_user_data_lm.contains"), "data.verifier"
    )
    assert fn("q", "abc", "b") == 1.0 and fn("q", "abc", "d") == 0.0
    with pytest.raises(ConfigError, match="returned 'a/b/c'"):
        build_verifier(FunctionVerifier(function="os.path:join"), "data.verifier")("a", "b", "c")


# ----------------------------------------------------------------------------------------------------
# Bad input: exit 2, one message, nothing written
# ----------------------------------------------------------------------------------------------------


def _bad(tmp_path, capsys, train: Path, *overrides: str) -> str:
    out = tmp_path / "bad-run"
    assert _run(_config(tmp_path, train, "bad.yaml"), out, *overrides) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_data_files_exit_2_naming_the_problem(tmp_path, capsys):
    assert "does not exist" in _bad(tmp_path, capsys, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _bad(tmp_path, capsys, empty)
    odd = tmp_path / "train.xml"
    odd.write_text("<rows/>")
    assert "cannot tell the format" in _bad(tmp_path, capsys, odd)
    train = _jsonl(tmp_path / "train.jsonl", _pairs())
    err = _bad(tmp_path, capsys, train, "data.fields.completion=output")
    assert "'output'" in err and "prompt, completion, answer" in err  # the fields it does have
    err = _bad(tmp_path, capsys, train, "data.name=messages", "data.seq_len=64")
    assert "'messages'" in err and "prompt" in err
    err = _bad(tmp_path, capsys, train, "data.validation=20", "data.test=10")
    assert "leaving none to train on" in err


def test_a_missing_chat_template_and_a_verifier_that_does_not_import_exit_2(tmp_path, capsys):
    tok = train_tokenizer("", kind="byte", use_cache=False)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    chats = _jsonl(tmp_path / "chats.jsonl", _chats())
    err = _bad(
        tmp_path,
        capsys,
        chats,
        "data.name=messages",
        f"data.tokenizer={{kind: pretrained, pretrained: {tmp_path / 'tok'}}}",
    )
    assert "has none" in err and str(tmp_path / "tok") in err and "data.chat_template" in err
    template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    out = tmp_path / "run"
    assert _run(_config(tmp_path, chats), out, "data.name=messages", "data.seq_len=64", f"data.chat_template={json.dumps(template)}",
                f"data.tokenizer={{kind: pretrained, pretrained: {tmp_path / 'tok'}}}") == 0  # fmt: skip
    pairs = _jsonl(tmp_path / "train.jsonl", _pairs())
    err = _bad(tmp_path, capsys, pairs, "data.verifier=no_such_module_here:check")
    assert "data.verifier.function='no_such_module_here:check' does not import" in err
    err = _bad(tmp_path, capsys, pairs, "data.verifier=os.path:no_such_function")
    assert "has no attribute 'no_such_function'" in err


def test_invalid_user_data_configs_fail_before_anything_runs(tmp_path):
    def error(*overrides):
        with pytest.raises(ConfigError) as info:
            load_config("lm-prompt-completion-kd", list(overrides))
        return str(info.value)

    assert "set data.train" in error("data.train=null")
    assert "streaming=true is supported for plain text" in error("data.train.streaming=true")
    assert "for chats" in error("data.train_on=last")
    assert "is built in" in error("data.name=arithmetic")
    assert "samples responses to prompts" in error(
        "data.name=text", "data.verifier=null", "method.name=on_policy"
    )
    assert "needs a pattern" in error("data.verifier=regex")


# ----------------------------------------------------------------------------------------------------
# The shipped recipe
# ----------------------------------------------------------------------------------------------------


def test_the_prompt_completion_recipe_is_listed_and_runs_reduced(tmp_path, monkeypatch):
    listed = {r.name: r for r in list_recipes()}
    recipe = listed["lm-prompt-completion-kd"]
    assert "seconds" in recipe.duration and "TIME" not in recipe.duration
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the recipe's data paths are from the root
    out = tmp_path / "run"
    assert main(["run", "lm-prompt-completion-kd", "teacher.train.steps=2", "train.steps=2", "train.eval_every=0",
                 "data.max_eval_blocks=4", f"output.dir={out}", "--no-progress"]) == 0  # fmt: skip
    assert 0.0 <= _result(out)["metrics"]["task_accuracy"] <= 100.0
