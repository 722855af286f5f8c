"""Execute a language-model distillation run (``task: lm``).

Per seed: the tokenizer (trained on the training text, cached), the teacher LM (trained first and
cached by config hash, or loaded), then the same student from the same initial weights trained as a
plain SFT student (cross-entropy) and with the configured distillation terms, token by token, through
the one training loop. Every term averages over the valid (unmasked) tokens of the global batch.

Writes, like the classification runner::

    <run_dir>/config.yaml, summary.json, report.md
    <run_dir>/seed-<s>/<arm>/{metrics.jsonl, checkpoints/, model/ (save_pretrained + tokenizer), result.json}
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distillery import functional as DF
from distillery.data.text import TokenDataset, lm_datasets, split_austen
from distillery.data.text.arithmetic import verify
from distillery.data.text.collate import collate_prompts, special_ids
from distillery.data.text.tokenizer import load_pretrained_tokenizer, tokenizer_differences
from distillery.errors import ConfigError
from distillery.lm.config import LMRunConfig
from distillery.lm.models import build_causal_lm
from distillery.losses import LOSSES, build_objective
from distillery.losses.logit import CrossEntropyConfig
from distillery.models import count_parameters
from distillery.models.hf import HFCausalLMAdapter, chunked_loss_support
from distillery.report import fmt, mean_std, paired_difference
from distillery.runner import _write_atomic, start_run
from distillery.teachers import FrozenTeacher, TeacherStore, config_hash
from distillery.train import fit

BASELINE, DISTILLED = "baseline", "distilled"


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def prepare_data(cfg: LMRunConfig) -> dict[str, Any]:
    """Tokenizer, training set, test set (and the test prompts of a task)."""
    d = cfg.data
    if d.name == "austen":
        splits = split_austen()
        tokenizer = d.tokenizer.build(list(splits.train))
        sets = lm_datasets(splits, tokenizer, d.seq_len, names=("train", "test"))
        train, test = sets["train"], sets["test"]
        task = None
    else:
        task = d.arithmetic.build()
        train_pairs, test_pairs = task.split(d.arithmetic.train, d.arithmetic.test)
        text = [p.prompt + p.response for p in train_pairs]
        tokenizer = d.tokenizer.build(text)
        train = TokenDataset.from_pairs(train_pairs, tokenizer, d.seq_len)
        test = TokenDataset.from_pairs(test_pairs, tokenizer, d.seq_len)
        check = functools.partial(verify, eos=tokenizer.eos_token, reverse=task.reverse)
        return {"tokenizer": tokenizer, "train": train, "test": _cap(test, d.max_eval_blocks),
                "task": test_pairs, "train_pairs": train_pairs, "check": check}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    if d.max_train_blocks is not None and len(train) > d.max_train_blocks:
        train = train.subset(torch.randperm(len(train), generator=g)[: d.max_train_blocks].sort().values)
    return {"tokenizer": tokenizer, "train": train, "test": _cap(test, d.max_eval_blocks), "task": task}


def _cap(dataset: TokenDataset, limit: int | None) -> TokenDataset:
    if limit is not None and len(dataset) > limit:
        return dataset.subset(torch.arange(limit))
    return dataset


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    dataset: TokenDataset,
    batch_size: int,
    device,
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Per-token NLL and perplexity over the labelled tokens of ``dataset``; with ``teacher``, the
    top-1 next-token agreement with it (percent)."""
    adapter = HFCausalLMAdapter()
    was_training = model.training
    model.eval()
    total_nll, total_tokens, agree = 0.0, 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = adapter.forward(model, batch).logits.float()  # (B, T-1, V)
            target, mask = adapter.rows(batch)
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            total_nll += float(DF.cross_entropy(logits, target, mask=mask, reduction="sum"))
            total_tokens += int(mask.sum())
            if teacher is not None:
                t_logits = adapter.forward(teacher, batch).logits.float()
                if vocab_size is not None:
                    t_logits = t_logits[..., :vocab_size]
                agree += int((logits.argmax(-1) == t_logits.argmax(-1))[mask].sum())
    finally:
        model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    out = {"nll": mean, "perplexity": math.exp(min(mean, 50.0))}
    if teacher is not None:
        out["agreement"] = 100.0 * agree / max(total_tokens, 1)
    return out


@torch.no_grad()
def task_accuracy(
    model: nn.Module,
    tokenizer,
    pairs,
    device,
    max_new_tokens: int,
    check: Callable[[str, str], bool],
    batch_size: int = 64,
) -> float:
    """Exact-match accuracy (percent) of greedy completions of the task's test prompts, as judged by
    ``check(prompt, completion_text)``."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = collate_prompts([p.prompt for p in chunk], tokenizer)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            completions = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False
            )
            correct += sum(check(p.prompt, c) for p, c in zip(chunk, completions))
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(pairs), 1)


# ----------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------


def obtain_teacher(cfg: LMRunConfig, data: dict, seed: int, acc, console: Console, progress: bool):
    t = cfg.teacher
    tokenizer = data["tokenizer"]
    n_vocab = len(tokenizer)
    if t.train is None:
        return build_causal_lm(t.model, n_vocab, tokenizer), {
            "source": t.model.pretrained,
            "cached": False,
            "seconds": 0.0,
        }
    key = config_hash(
        {
            "kind": "lm-teacher",
            "model": t.model.model_dump(mode="json"),
            "train": t.train.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json", exclude={"max_eval_blocks"}),
            "seed": seed,
        }
    )
    store = TeacherStore(t.cache_dir)
    torch.manual_seed(1000 + seed)
    model = build_causal_lm(t.model, n_vocab, tokenizer)
    if t.cache and store.has(key):
        store.load(key, model)
        return model, {"source": str(store.path(key)), "cache_key": key, "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    fit(
        model,
        data["train"],
        build_objective({"ce": CrossEntropyConfig()}),
        t.train,
        adapter=HFCausalLMAdapter(),
        seed=1000 + seed,
        accelerator=acc,
        progress=progress,
        label=f"seed {seed} teacher",
    )
    seconds = time.perf_counter() - t0
    info = {"cache_key": key, "cached": False, "seconds": seconds}
    if t.cache and acc.is_main_process:
        info["source"] = str(store.save(key, model, {"seed": seed, "seconds": seconds}))
    acc.wait_for_everyone()
    return model, info


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def method_data(cfg: LMRunConfig, data: dict, teacher: nn.Module, seed: int, console: Console):
    """``(training set, batch transform)`` of the distilled arm for ``cfg.method``."""
    from distillery.generation import OnPolicyBatches, PacedBatches, SpeculativeBatches, sequence_level_pairs
    from distillery.teachers.store import default_cache_root

    m, tokenizer = cfg.method, data["tokenizer"]
    pad_id, _, eos_id = special_ids(tokenizer)
    if m.name == "token":
        return data["train"], None
    if m.name == "sequence":
        cache = default_cache_root().parent / "sequences"
        pairs = sequence_level_pairs(
            teacher, data["train_pairs"], tokenizer, cache_dir=cache, max_new_tokens=m.max_new_tokens
        )
        console.print(
            f"  seed {seed}: {len(pairs)} teacher responses for sequence-level KD (cached in {cache})"
        )
        return TokenDataset.from_pairs(pairs, tokenizer, cfg.data.seq_len), None
    common = {"max_new_tokens": m.max_new_tokens, "temperature": m.temperature, "seed": seed}
    if m.name == "on_policy":
        return data["train"], OnPolicyBatches(m.student_lambda, pad_id=pad_id, eos_id=eos_id, **common)
    if m.name == "paced":  # fixed responses; each problem weighted by the student's pass rate on it
        p = m.paced
        return data["train"], PacedBatches(
            data["check"],
            tokenizer,
            samples=p.samples,
            a=p.a,
            b=p.b,
            normalize=p.normalize,
            every=p.every,
            pad_id=pad_id,
            eos_id=eos_id,
            **common,
        )
    return data["train"], SpeculativeBatches(
        teacher, top_k=m.top_k, student_lambda=m.student_lambda, pad_id=pad_id, eos_id=eos_id, **common
    )


def _aligned_loss(cfg: LMRunConfig, shared_vocab: int, padded: bool) -> dict:
    """The loss section with ``vocab_size`` set to the shared tokenizer size when vocabularies are padded."""
    if not padded:
        return cfg.loss
    out = {}
    for label, term in cfg.loss.items():
        if "vocab_size" in type(term).model_fields and term.vocab_size is None:
            term = term.model_copy(update={"vocab_size": shared_vocab})
        out[label] = term
    return out


def check_model_tokenizers(cfg: LMRunConfig, tokenizer: Any) -> list[str]:
    """Refuse pretrained models saved with a tokenizer other than the run's; return notes for the log.

    Token-level distillation compares distributions id by id, so the teacher, the student and the
    data must share one tokenizer (a model whose vocabulary is padded beyond it is fine). A pretrained
    model directory (or hub id) without a tokenizer is assumed to use the run's, with a note.
    """

    notes = []
    sides = [("teacher", None if cfg.teacher is None else cfg.teacher.model), ("student", cfg.student)]
    for who, model in sides:
        if model is None or model.pretrained is None:
            continue
        try:
            own = load_pretrained_tokenizer(model.pretrained)
        except ConfigError:
            notes.append(
                f"no tokenizer saved with the {who} {model.pretrained!r}; assuming it uses the run's"
            )
            continue
        diffs = tokenizer_differences(own, tokenizer)
        if diffs:
            raise ConfigError(
                f"the {who} model {model.pretrained!r} comes with a tokenizer that differs from the run's "
                f"(its vs the run's: {'; '.join(diffs)}). Teacher, student and data must share one tokenizer: "
                f"set data.tokenizer={{kind: pretrained, pretrained: {model.pretrained}}} (cross-tokenizer "
                "distillation is not supported yet)"
            )
    return notes


def chunked_loss_plan(cfg: LMRunConfig, student: nn.Module, teacher: nn.Module | None) -> tuple[bool, str]:
    """Whether the training loss is computed chunk by chunk from hidden states, and why (for the log).

    ``chunked_loss.enabled``: ``false`` never; ``true`` always (a model that cannot is an error:
    the configuration already refused loss terms and methods that cannot); ``auto`` when every term
    and both models support it and one micro-batch's logits (``batch_size / grad_accum`` sequences of
    ``data.seq_len`` tokens times the student's vocabulary) exceed ``chunked_loss.threshold`` values.
    """

    c = cfg.chunked_loss
    if c.enabled is False:
        return False, "off (chunked_loss.enabled=false)"
    reasons = [
        f"loss.{label} ({term.name}) needs full logits"
        for label, term in cfg.loss.items()
        if not LOSSES[term.name][1].supports_hidden
    ]
    if cfg.method.name == "paced":
        reasons.append("method.name=paced weights each row")
    for who, model in (("student", student), ("teacher", teacher)):
        why = None if model is None else chunked_loss_support(model)
        if why is not None:
            reasons.append(f"the {who}: {why}")
    if reasons:
        if c.enabled is True:
            raise ConfigError(
                f"chunked_loss.enabled=true, but {'; '.join(reasons)}; set chunked_loss.enabled=auto"
            )
        return False, f"off ({'; '.join(reasons)})"
    vocab = student.get_output_embeddings().weight.shape[0]
    tokens = cfg.train.batch_size // cfg.train.grad_accum * cfg.data.seq_len
    if c.enabled == "auto" and not DF.should_chunk(tokens, vocab, c.threshold):
        return False, f"off (auto: {tokens:,} tokens x {vocab:,} vocabulary <= threshold {c.threshold:,})"
    return (
        True,
        f"on, {c.chunk_size} tokens per chunk ({tokens:,} tokens x {vocab:,} vocabulary per micro-batch)",
    )


def run_lm(
    cfg: LMRunConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    accelerator=None,
) -> dict[str, Any]:
    """Execute an LM run config; returns the summary (also written to ``summary.json``)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress display only
    acc, console, progress, run_dir = start_run(cfg, resume, console, progress, accelerator)
    main = acc.is_main_process

    t_start = time.perf_counter()
    data = prepare_data(cfg)
    tokenizer = data["tokenizer"]
    n_vocab = len(tokenizer)
    special_ids(tokenizer)  # a clear error now if pad, bos or eos is missing
    for note in check_model_tokenizers(cfg, tokenizer):
        console.print(f"  note: {note}")
    console.print(
        f"[bold]{cfg.name}[/bold]: {cfg.data.name}, tokenizer {cfg.data.tokenizer.kind} ({n_vocab} tokens), "
        f"{len(data['train'])} training / {len(data['test'])} test sequences of <= {cfg.data.seq_len} tokens "
        f"({data['train'].num_targets():,} training targets) -> {run_dir}"
    )
    arms = ([BASELINE] if cfg.baseline is not None and cfg.baseline.enabled else []) + [DISTILLED]
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    teachers: dict[int, dict] = {}
    max_new = cfg.data.arithmetic.digits[1] + 2

    def evaluate_with(teacher_model, vocab):
        def evaluate(model: nn.Module) -> dict[str, float]:
            out = lm_metrics(model, data["test"], cfg.eval.batch_size, acc.device, teacher_model, vocab)
            if data["task"] is not None:
                out["task_accuracy"] = task_accuracy(
                    model, tokenizer, data["task"], acc.device, max_new, data["check"]
                )
            return out

        return evaluate

    for seed in cfg.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        teacher = t_model = None
        if cfg.teacher is not None:
            t_model, t_info = obtain_teacher(cfg, data, seed, acc, console, progress)
            t_model = t_model.to(acc.device)
            t_info.update(metrics=evaluate_with(None, n_vocab)(t_model), params=count_parameters(t_model))
            teachers[seed] = t_info
            if main:
                _write_atomic(seed_dir / "teacher.json", json.dumps(t_info, indent=2))
            how = "cached" if t_info["cached"] else f"trained in {t_info['seconds']:.1f}s"
            console.print(f"  seed {seed} teacher: perplexity {t_info['metrics']['perplexity']:.2f} ({how})")

        torch.manual_seed(seed)
        student0 = build_causal_lm(cfg.student, n_vocab, tokenizer)
        chunked, why = chunked_loss_plan(cfg, student0, t_model)
        if seed == cfg.seeds[0]:
            console.print(f"  chunked loss: {why}")
        adapter = HFCausalLMAdapter(hidden_states=chunked)
        if t_model is not None:
            teacher = FrozenTeacher(t_model, adapter)
        init_state = {k: v.clone() for k, v in student0.state_dict().items()}
        padded = (
            t_model is not None
            and t_model.get_output_embeddings().weight.shape[0]
            != (student0.get_output_embeddings().weight.shape[0])
        )
        for arm in arms:
            arm_dir = seed_dir / arm
            done = arm_dir / "result.json"
            if resume and done.is_file():
                results[arm][seed] = json.loads(done.read_text())
                console.print(f"  seed {seed} {arm}: already complete")
                continue
            train_set, transform = data["train"], None
            if arm == BASELINE:
                objective = build_objective({"ce": CrossEntropyConfig()})
                train_cfg, arm_teacher = cfg.baseline.train or cfg.train, None
            else:
                objective = build_objective(_aligned_loss(cfg, n_vocab, padded))
                train_cfg, arm_teacher = cfg.train, teacher
                train_set, transform = method_data(cfg, data, t_model, seed, console)
            for term in objective.terms.values():
                term.chunk_size = cfg.chunked_loss.chunk_size
            student = build_causal_lm(cfg.student, n_vocab, tokenizer)
            student.load_state_dict(init_state)
            fitted = fit(
                student,
                train_set,
                objective,
                train_cfg,
                teacher=arm_teacher,
                adapter=adapter,
                seed=seed,
                run_dir=arm_dir,
                evaluate=evaluate_with(t_model, n_vocab),
                resume=resume,
                accelerator=acc,
                progress=progress,
                label=f"seed {seed} {arm}",
                tensorboard=cfg.output.tensorboard,
                batch_transform=transform,
            )
            final = fitted.history[-1] if fitted.history else {}
            record = {
                "seed": seed,
                "arm": arm,
                "metrics": {k: v for k, v in final.items() if k not in ("step", "epoch")},
                "params": count_parameters(fitted.model),
                "steps": fitted.steps,
                "seconds": fitted.seconds,
                "samples_per_second": fitted.samples_per_second,
                "chunked_loss": chunked,
                "history": fitted.history,
            }
            if transform is not None:
                record["sampling"] = transform.metrics()
            if main:
                fitted.model.save_pretrained(arm_dir / "model")
                tokenizer.save_pretrained(arm_dir / "model")
                _write_atomic(done, json.dumps(record, indent=2))
            results[arm][seed] = record
            m = record["metrics"]
            extra = f", task accuracy {m['task_accuracy']:.1f}%" if "task_accuracy" in m else ""
            agree = f", agreement {m['agreement']:.1f}%" if "agreement" in m else ""
            console.print(
                f"  seed {seed} {arm}: perplexity {m['perplexity']:.2f}{agree}{extra} "
                f"({fitted.seconds:.1f}s, {fitted.samples_per_second:,.1f} sequences/s)"
            )
    summary = summarize_lm(cfg, teachers, results, time.perf_counter() - t_start)
    if main:
        _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        _write_atomic(run_dir / "report.md", report_lm(cfg, summary))
    print_lm(console, summary, run_dir)
    summary["run_dir"] = str(run_dir)
    return summary


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------

LM_METRICS = ("perplexity", "nll", "agreement", "task_accuracy")
LABELS = {"teacher": "teacher", BASELINE: "student SFT", DISTILLED: "student KD"}


def summarize_lm(cfg: LMRunConfig, teachers: dict, results: dict, seconds: float) -> dict[str, Any]:
    models: dict[str, Any] = {}
    groups = {"teacher": teachers, **results} if teachers else dict(results)
    for key, by_seed in groups.items():
        if not by_seed:
            continue
        records = list(by_seed.values())
        models[key] = {
            "label": LABELS[key],
            **{
                m: mean_std([r["metrics"][m] for r in records])
                for m in LM_METRICS
                if m in records[0]["metrics"]
            },
            "params": records[0]["params"],
            "seconds": mean_std([r["seconds"] for r in records]),
        }
    paired = {}
    if results.get(BASELINE) and results.get(DISTILLED):
        for m in ("perplexity", "nll", "task_accuracy"):
            if m in next(iter(results[DISTILLED].values()))["metrics"]:
                paired[m] = paired_difference(
                    {s: r["metrics"][m] for s, r in results[DISTILLED].items()},
                    {s: r["metrics"][m] for s, r in results[BASELINE].items()},
                )
    return {"name": cfg.name, "seeds": cfg.seeds, "models": models, "paired_distilled_minus_baseline": paired,
            "seconds": seconds}  # fmt: skip


HEADERS = ["model", "perplexity", "NLL / token", "agreement %", "task accuracy %", "params", "time"]


def _table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the summary table; the task-accuracy column only when the run has a task."""
    with_task = any("task_accuracy" in m for m in summary["models"].values())
    headers = [h for h in HEADERS if with_task or h != "task accuracy %"]
    rows = []
    for m in summary["models"].values():
        row = [
            m["label"],
            fmt(m["perplexity"], 2),
            fmt(m["nll"], 3),
            fmt(m["agreement"], 1) if "agreement" in m else "-",
            *([fmt(m["task_accuracy"], 1) if "task_accuracy" in m else "-"] if with_task else []),
            f"{m['params']:,}",
            fmt(m["seconds"], 1) + " s",
        ]
        rows.append(row)
    return headers, rows


def _paired_line(summary: dict) -> str | None:
    p = summary["paired_distilled_minus_baseline"].get("perplexity")
    if not p or p["n"] == 0:
        return None
    better = p["n"] - p["wins"]  # lower perplexity is better
    return (
        f"paired perplexity difference, KD - SFT student: {fmt(p, 2, signed=True)} over {p['n']} seed(s); "
        f"KD better in {better}/{p['n']}"
    )


def print_lm(console: Console, summary: dict, run_dir: Path) -> None:
    from rich.table import Table

    table = Table(
        title=f"{summary['name']}: mean ± std over {len(summary['seeds'])} seed(s)", title_justify="left"
    )
    headers, rows = _table(summary)
    for h in headers:
        table.add_column(h, justify="left" if h == "model" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    line = _paired_line(summary)
    if line:
        console.print(f"[bold]{line}[/bold]")
    console.print(f"total wall time {summary['seconds']:.1f}s; report: {run_dir / 'report.md'}")


def report_lm(cfg: LMRunConfig, summary: dict) -> str:
    terms = " + ".join(f"{k} (weight {v.weight:g})" for k, v in cfg.loss.items())
    lines = [f"# {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [
        f"Mean ± standard deviation over seeds {cfg.seeds}, on the {cfg.data.name} test split.",
        "",
        "- **student SFT**: the student trained with cross-entropy on the training data.",
        f"- **student KD**: the same student (same initial weights and steps) trained with {terms}.",
        "- *perplexity*: exp of the mean next-token NLL over the test tokens; *agreement*: top-1 next-token "
        "agreement with the teacher.",
        "",
    ]
    headers, rows = _table(summary)
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    line = _paired_line(summary)
    if line:
        lines += ["", f"**{line[0].upper() + line[1:]}.**"]
    lines += ["", f"Total wall time: {summary['seconds']:.1f} s. Resolved configuration: `config.yaml`.", ""]
    return "\n".join(lines)
