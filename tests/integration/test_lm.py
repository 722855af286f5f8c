"""Language-model distillation: token-level KD through the one loop, end to end on tiny models."""

import json
import math

import pytest
import torch

from distillery.cli import main
from distillery.config import load_config
from distillery.losses import LossInputs, Objective
from distillery.losses.logit import CrossEntropyLoss, ForwardKLLoss
from distillery.models.causal_lm import CausalLMConfig, build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.teachers import FrozenTeacher

TINY = [
    "teacher.train.steps=6",
    "train.steps=6",
    "train.eval_every=3",
    "data.max_train_blocks=48",
    "data.max_eval_blocks=8",
    "data.seq_len=32",
    "data.tokenizer.vocab_size=300",
    "--no-progress",
]


def _batch_with_uneven_lengths(vocab=40, batch=4, length=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    labels = ids.clone()
    lengths = [9, 4, 7, 2]
    attention = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
        labels[i, n:] = -100
        ids[i, n:] = 0
    labels[0, :3] = -100  # a prompt: not predicted
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_token_level_kd_gradient_equals_the_naive_per_token_computation():
    torch.manual_seed(0)
    small = CausalLMConfig(hidden_size=16, layers=1, heads=2)
    student = build_causal_lm(small, 40).double()
    teacher_model = build_causal_lm(CausalLMConfig(hidden_size=24, layers=1, heads=2), 40).double()
    batch = _batch_with_uneven_lengths()
    adapter = HFCausalLMAdapter()
    objective = Objective(
        {"ce": CrossEntropyLoss(), "kd": ForwardKLLoss(temperature=2.0)}, {"ce": 0.5, "kd": 0.5}
    )
    target, mask = adapter.rows(batch)
    counts = objective.counts(target, mask)
    s_logits = adapter.forward(student, batch).logits
    t_logits = FrozenTeacher(teacher_model, adapter, keep_dtype=True)(batch).logits.double()
    parts = objective(
        LossInputs(student_logits=s_logits, target=target, mask=mask, teacher_logits=t_logits), counts
    )
    objective.total(parts, 0.0).backward()
    got = [p.grad.clone() for p in student.parameters()]

    # naive: a Python loop over every predicted token, divided by the number of such tokens
    student.zero_grad()
    s_logits = adapter.forward(student, batch).logits
    total, n = 0.0, 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            if target[b, t] == -100:
                continue
            log_s = torch.log_softmax(s_logits[b, t], -1)
            log_s2 = torch.log_softmax(s_logits[b, t] / 2.0, -1)
            log_t2 = torch.log_softmax(t_logits[b, t] / 2.0, -1)
            kl = (log_t2.exp() * (log_t2 - log_s2)).sum() * 4.0
            total = total + 0.5 * (-log_s[target[b, t]]) + 0.5 * kl
            n += 1
    (total / n).backward()
    assert n == int(mask.sum()) == (9 - 1 - 2) + (4 - 1) + (7 - 1) + (2 - 1)  # shifted; prompt of row 0
    for a, b in zip(got, (p.grad for p in student.parameters())):
        assert torch.allclose(a, b, atol=1e-10)


def test_lm_recipe_end_to_end_saves_a_loadable_student(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(["run", "lm-kd", *TINY, f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "student KD" in printed and "perplexity" in printed
    assert "task accuracy" not in printed + (out / "report.md").read_text()  # no task on the corpus
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    assert summary["models"]["distilled"]["perplexity"]["mean"] > 1.0
    model_dir = out / "seed-0" / "distilled" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged")])
    cfg = load_config("lm-kd", [a for a in TINY if a != "--no-progress"])
    assert loaded.config.vocab_size == len(tokenizer) and cfg.student.hidden_size == loaded.config.hidden_size
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_lm_arithmetic_task_reports_exact_match_accuracy(tmp_path):
    out = tmp_path / "run"
    args = ["data.name=arithmetic", "data.seq_len=16", "data.arithmetic.train=200", "data.arithmetic.test=20",
            "data.tokenizer={kind: byte}"]  # fmt: skip
    assert main(["run", "lm-kd", *TINY, *args, f"output.dir={out}"]) == 0
    assert "| task accuracy % |" in (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher", "baseline", "distilled"):
        acc = summary["models"][key]["task_accuracy"]["mean"]
        assert 0.0 <= acc <= 100.0


def test_reversed_arithmetic_trains_and_checks_reversed_answers():
    from distillery.tasks.lm import prepare_data

    cfg = load_config("lm-kd", ["data.name=arithmetic", "data.seq_len=16", "data.arithmetic.train=30",
                                "data.arithmetic.test=10", "data.tokenizer={kind: byte}",
                                "data.arithmetic.reverse=true"])  # fmt: skip
    data = prepare_data(cfg)
    tok = data["tokenizer"]
    for pair in data["problems"]["test"]:
        plain = str(eval(pair.prompt[:-1]))  # the prompts are "a+b="
        assert pair.response == plain[::-1]
        assert data["check"](pair.prompt, pair.response + tok.eos_token)
        assert data["check"](pair.prompt, plain + tok.eos_token) == (plain == plain[::-1])
    row = data["train"].get_batch(torch.arange(1))
    trained = row["labels"][0][row["labels"][0] != -100].tolist()
    assert tok.decode(trained, skip_special_tokens=True) == data["train_pairs"][0].response


def test_padded_teacher_vocabulary_is_sliced_to_the_shared_tokens(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "lm-kd", *TINY, "teacher.model.vocab_size=320", f"output.dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["teacher"]["params"] > summary["models"]["distilled"]["params"]


def test_lm_config_errors_are_user_errors(capsys):
    assert main(["run", "lm-kd", "student.hidden_size=30", "student.heads=4"]) == 2
    assert "hidden_size=30 must be a multiple of heads=4" in capsys.readouterr().err
    assert main(["run", "lm-kd", "task=vision"]) == 2
    assert "unknown task 'vision'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["teacher.train=null"])
def test_lm_teacher_needs_a_source(bad, capsys):
    assert main(["run", "lm-kd", bad]) == 2
    assert "teacher.train (train it first) or teacher.model.pretrained" in capsys.readouterr().err


ARITH = ["data.name=arithmetic", "data.seq_len=16", "data.arithmetic.train=120", "data.arithmetic.test=12",
         "data.tokenizer={kind: byte}"]  # fmt: skip


@pytest.mark.parametrize("method", ["sequence", "on_policy", "speculative"])
def test_every_lm_method_runs_end_to_end(method, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [*TINY, *ARITH, f"method.name={method}", "method.student_lambda=1.0", "method.max_new_tokens=4"]
    assert main(["run", "lm-kd", *args, f"output.dir={out}"]) == 0
    record = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    if method == "sequence":
        assert list((tmp_path / "cache" / "sequences").glob("seqkd-*.jsonl"))  # generated once, cached
    else:
        assert record["sampling"]["on_policy_fraction"] == 1.0  # lambda = 1: every batch sampled
    if method == "speculative":
        assert 0.0 <= record["sampling"]["acceptance_rate"] <= 1.0


def test_sampling_methods_need_prompts(capsys):
    assert main(["run", "lm-kd", "method.name=on_policy"]) == 2
    assert "use data.name=arithmetic" in capsys.readouterr().err


def test_paced_method_runs_end_to_end(tmp_path, monkeypatch):
    """PACED: the student's pass rates weight the fixed responses; the run records them."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [
        *TINY,
        *ARITH,
        "method.name=paced",
        "method.paced={samples: 2, a: 1.0, b: 2.0}",
        "method.max_new_tokens=5",
    ]
    assert main(["run", "lm-kd", *args, "baseline.enabled=false", f"output.dir={out}"]) == 0
    arm = out / "seed-0" / "distilled"
    sampling = json.loads((arm / "result.json").read_text())["sampling"]
    assert 0.0 <= sampling["mean_pass_rate"] <= 1.0 and 0.0 <= sampling["mean_weight"] <= 1.0
    assert sampling["estimated"] == 1.0  # every = 1: fresh pass rates at every step
    train = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    if sampling["mean_weight"] == 0.0:  # a 6-step student solves nothing: every problem has weight 0
        assert all(r["loss"] == 0.0 for r in train)


def test_paced_needs_a_verifiable_task(capsys):
    assert main(["run", "lm-kd", "method.name=paced"]) == 2
    assert "use data.name=arithmetic" in capsys.readouterr().err
    assert main(["run", "lm-kd", *ARITH, "method.name=paced", "method.paced.samples=0"]) == 2
    assert "method.paced.samples" in capsys.readouterr().err


def test_eval_reloads_lm_students_and_reproduces_their_numbers(tmp_path, capsys):
    from distillery.experiment import evaluate_run

    out = tmp_path / "run"
    assert main(["run", "lm-kd", *TINY, f"output.dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    again = evaluate_run(out).summary
    for key in ("teacher", "baseline", "distilled"):
        for metric in ("perplexity", "nll"):
            assert again["models"][key][metric]["mean"] == pytest.approx(
                summary["models"][key][metric]["mean"], rel=1e-6
            ), (key, metric)
    assert again["models"]["distilled"]["agreement"]["mean"] == pytest.approx(
        summary["models"]["distilled"]["agreement"]["mean"]
    )
    assert main(["eval", str(out / "seed-0" / "baseline")]) == 0
    assert "student SFT" in capsys.readouterr().out
