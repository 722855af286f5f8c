"""Teacher-output caches (``teacher.source: cache``): bytes per token, student quality, step time.

Three parts, selectable with ``--parts bytes quality steps`` (default: all three):

**bytes** -- what :func:`distillery.cache.write_outputs` stores and how fast. A Llama teacher of lm-kd's
size (hidden 128, 2 layers, 4 heads, built with :func:`~distillery.models.causal_lm.build_causal_lm`,
random init, seed 0) runs over the first 512 training blocks of 64 tokens of the Austen corpus (lm-kd's
bpe tokenizer of 1,024 ids), with a head of 1,024 rows and of 32,768 rows (the same token ids: a
padded vocabulary). Each setting is written to a temporary folder: dense fp16 logits; top-k + tail at
k = 8, 32, 64 (fp16 log-probabilities, and int8 at k = 64); sampled at k = 8, 32, 64 (k draws, fp16;
int8 at k = 64). **B/token** = the bytes of all shard files / the stored positions (rows x 63):
indices, values, tail mass or counts, the row index and the safetensors headers, all included. The
layout has a fixed size per position, so random weights give the same bytes as trained ones. **write
tok/s** = stored positions / the seconds of ``write_outputs`` (teacher forward, compression, shard
files, checksums), beside **forward tok/s**, the teacher's forward alone over the same rows. The
storage error is read back through :class:`~distillery.cache.OutputCache` and compared with the
teacher's fp32 log-probabilities at the kept ids: **logp MAE** / **max err** (mean / largest absolute
error over the kept slots; sampled: the slots with draws), **tail mass** (top-k: mean probability
outside the k ids), **distinct ids** (sampled: mean ids with draws per token), **dense KL** (dense:
mean KL(p_fp32 || p_stored) per token). These depend on the teacher's distribution: a random teacher's
is nearly uniform, so the same rows are also measured with seed 0's trained lm-kd teacher at 1,024 ids
when the quality part has trained it (same run, or the saved JSON with ``--resume``). Reference:
DistillKit (Arcee AI, github.com/arcee-ai/DistillKit) reports about 300 B/token for its recommended
offline settings; that figure is theirs, not measured here. Target: <= 300 B/token at k = 64,
indices included.

**quality** -- the lm-kd recipe (Austen, bpe 1,024, seq_len 64, 8,000 training blocks, the 2-layer
teacher trained 1,500 steps and kept in the teacher store, the student 800 steps, loss 0.5 CE + 0.5
forward KL) with ``baseline.enabled=false`` and ``train.eval_every=0``, seeds 0, 1, 2, one arm per run
(:func:`distillery.load_config` + :func:`distillery.run`): the live dense teacher (lm-kd as is), a
dense fp32 cache, top-k + tail (fp16) and sampled (fp16) caches at k = 8, 32, 64. Reported: test
perplexity and top-1 agreement with the teacher, mean ± std over seeds; the paired difference in
perplexity to the live teacher (mean ± std of the per-seed differences; "better" counts seeds with a
lower perplexity). Target ("sampled or top-k+tail at k = 64 within one standard deviation of the
dense teacher"): |mean perplexity of the arm - mean of the live arm| <= the std over seeds of the live
arm's perplexity. The dense fp32 cache should train exactly like the live teacher; the largest
per-seed difference is reported. Caches and teachers go to ``DISTILLERY_CACHE`` (default
~/.cache/distillery): from an empty one, each seed's teacher is trained once, and each cache written
by the first run that needs it.

**steps** -- the time of one training step (student forward, teacher outputs: live forward or cache
lookup, the loss, backward, optimizer step), measured in one process, round-robin over the variants
(a warm-up round, then ``rounds`` rounds of a few steps each; the median ms/step): a CE step, a KD
step from a top-k (k = 64, fp16) cache, from a dense fp32 cache, and with the live teacher. The
language model: lm-kd's student and teacher (random init), batches of 32 x 64 tokens, the recipe's
loss. Classification: fashion-mnist-kd's CNN teacher and MLP student on Fashion-MNIST when its files
are present, else digits-kd's (the 2-CNN ensemble and the MLP) on scikit-learn digits; batches of the
recipe's size; no top-k row (10 classes). Built from the library's adapter, objective and teacher
objects as :func:`distillery.train.fit` uses them (its bookkeeping, the same for every variant, is
left out). Reported as ms/step and the ratio to the CE step. Target: the cached sparse KD step <= 1.15x
the CE step (language model). Torch runs with ``--threads`` threads (default 2), for every part.

    python benchmarks/teacher_cache.py                       # all three parts, 3 seeds
    python benchmarks/teacher_cache.py --quick               # a smoke test of the script (a few minutes)
    python benchmarks/teacher_cache.py --parts bytes steps   # only these parts
    python benchmarks/teacher_cache.py --resume              # keep the saved quality runs, run the rest

``--quick``: 64 blocks for bytes; quality with 1 seed, ``data.max_train_blocks=256``,
``teacher.train.steps=30``, ``train.steps=20`` and the k = 8 arms only; fewer rounds of steps. Without
``--resume`` the output holds the parts run now only; with it, the saved record's other parts and
finished quality runs are kept (its settings must match). Full run: about N minutes on a 2-core CPU
from an empty cache.

Writes ``benchmarks/results/teacher_cache.json`` (every number, the settings and the machine) and
``teacher_cache.md`` (the tables); ``-quick`` is added to the names with ``--quick``; ``--out`` changes
the folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console

import distillery as ds
from distillery import functional as DF
from distillery.cache import OutputCache, OutputsConfig, OutputSource, weights_sha256, write_outputs
from distillery.data import load_classification_data
from distillery.data.fashion_mnist import find_files
from distillery.data.text import lm_datasets, split_austen
from distillery.data.text.tokenizer import tokenizer_sha256
from distillery.losses import LossInputs, build_objective
from distillery.losses.logit import CrossEntropyConfig
from distillery.models import ClassifierAdapter, Ensemble, build_model
from distillery.models.causal_lm import build_causal_lm
from distillery.models.hf import HFCausalLMAdapter
from distillery.report.summary import fmt, mean_std, paired_difference, saved_record
from distillery.teachers import FrozenTeacher, OutputCacheTeacher, TeacherStore
from distillery.train.schedules import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("bytes", "quality", "steps")
DISTILLKIT_BYTES = 300  # DistillKit's published figure (Arcee AI), not measured here
TARGET_BYTES = 300  # the target at k = 64, indices included
TARGET_STEP_RATIO = 1.15  # cached sparse KD step / CE step
WRITE_BATCH = 32  # rows per teacher forward when writing (lm-kd's eval.batch_size, the task's default)
LIVE = "live dense teacher"


def sparse(kind: str, ks, values: str = "fp16") -> dict[str, dict]:
    name = {"topk": "top-k+tail", "sampled": "sampled"}[kind]
    return {f"{name} k={k} {values}": {"kind": kind, "k": k, "values": values} for k in ks}


BYTE_SETTINGS = {"dense fp16": {"kind": "dense", "values": "fp16"}, **sparse("topk", (8, 32, 64)),
                 **sparse("topk", (64,), "int8"), **sparse("sampled", (8, 32, 64)),
                 **sparse("sampled", (64,), "int8")}  # fmt: skip


def quality_arms(ks) -> dict[str, dict | None]:
    """arm -> teacher.outputs (None: the live teacher)."""
    return {LIVE: None, "cache dense fp32": {"kind": "dense", "values": "fp32"},
            **sparse("topk", ks), **sparse("sampled", ks)}  # fmt: skip


# ---- shared helpers -------------------------------------------------------------------------------


def austen_rows(n: int):
    """lm-kd's tokenizer and the first ``n`` of its 64-token training blocks."""
    cfg = ds.load_config("lm-kd")
    splits = split_austen()
    tokenizer = cfg.data.tokenizer.build(list(splits.train))
    train = lm_datasets(splits, tokenizer, cfg.data.seq_len, names=("train",))["train"]
    return cfg, tokenizer, train.subset(torch.arange(min(n, len(train))))


def lm_source(model, rows, tokenizer) -> OutputSource:
    """What the LM task hands the cache writer (:meth:`LMTask.output_source`), for ``rows``."""
    return OutputSource(
        dataset=rows,
        forward=FrozenTeacher(model, HFCausalLMAdapter()),
        keys=("input_ids", "attention_mask"),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        identity={"task": "lm", "teacher": weights_sha256(model), "tokenizer": tokenizer_sha256(tokenizer)},
        positions=int(rows.lengths().max()) - 1,
        valid=lambda batch: batch["labels"][:, 1:] != -100,
    )


def write_cache(folder: Path, source: OutputSource, outputs: dict, repeats: int = 1):
    """``(the cache, seconds of each write)``: written ``repeats`` times, each into an empty folder."""
    seconds = []
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        write_outputs(folder, source, OutputsConfig(**outputs), batch_size=WRITE_BATCH)
        seconds.append(time.perf_counter() - t0)
    return OutputCache(folder, verify=False), seconds


def batches_of(dataset, size: int):
    for start in range(0, len(dataset), size):
        yield dataset.get_batch(torch.arange(start, min(start + size, len(dataset))))


# ---- bytes ----------------------------------------------------------------------------------------


def storage_error(cache: OutputCache, source: OutputSource, outputs: dict) -> dict[str, float]:
    """The stored values read back against the teacher's fp32 outputs on the same rows."""
    kind, sums = (
        outputs["kind"],
        {"err": 0.0, "max": 0.0, "slots": 0.0, "tokens": 0.0, "tail": 0.0, "kl": 0.0},
    )
    for batch in batches_of(source.dataset, WRITE_BATCH):
        ref = source.forward(batch).logits.float()  # [B, T, V]
        keep = source.valid(batch)  # [B, T]
        got = {k: v[:, : ref.shape[1]] for k, v in cache.lookup(batch["index"]).items()}
        sums["tokens"] += float(keep.sum())
        if kind == "dense":
            sums["kl"] += float(DF.forward_kl(got["logits"], ref, mask=keep, reduction="sum"))
            continue
        exact = ref.log_softmax(-1).gather(-1, got["ids"])  # temperature 1
        slot = keep.unsqueeze(-1).expand_as(exact)
        if kind == "sampled":
            slot = slot & (got["weights"] > 0)
        err = (got["logp"] - exact).abs()[slot]
        sums["err"] += float(err.sum())
        sums["max"] = max(sums["max"], float(err.max()))
        sums["slots"] += float(slot.sum())
        if kind == "topk":
            sums["tail"] += float(got["tail"][keep].sum())
    n = sums["tokens"]
    if kind == "dense":
        return {"dense_kl": sums["kl"] / n}
    out = {"logp_mae": sums["err"] / sums["slots"], "logp_max_err": sums["max"]}
    out.update({"tail_mass": sums["tail"] / n} if kind == "topk" else {"distinct_ids": sums["slots"] / n})
    return out


def forward_rate(source: OutputSource) -> float:
    """Positions per second of the teacher's forward alone over the source's rows (after one warm-up batch)."""
    source.forward(source.dataset.get_batch(torch.arange(WRITE_BATCH)))
    t0 = time.perf_counter()
    for batch in batches_of(source.dataset, WRITE_BATCH):
        source.forward(batch)
    return len(source.dataset) * source.positions / (time.perf_counter() - t0)


def part_bytes(args, record: dict, console: Console) -> dict:
    cfg, tokenizer, rows = austen_rows(args.blocks)
    teachers = []
    for vocab in (len(tokenizer), 32768):
        torch.manual_seed(0)
        model = build_causal_lm(
            cfg.teacher.model.model_copy(update={"vocab_size": vocab}), len(tokenizer), tokenizer
        )
        teachers.append(("random init", model))
    trained = trained_teacher(record, cfg, tokenizer)
    if trained is not None:
        teachers.append(trained)
    out = []
    for who, model in teachers:
        source = lm_source(model, rows, tokenizer)
        tokens = len(rows) * source.positions
        rate = forward_rate(source)
        for label, outputs in BYTE_SETTINGS.items():
            with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
                cache, seconds = write_cache(Path(tmp) / "cache", source, outputs, args.repeats)
                row = {"teacher": who, "vocab": source.vocab_size, "setting": label, **outputs,
                       "bytes": cache.nbytes(), "tokens": tokens, "bytes_per_token": cache.nbytes() / tokens,
                       "write_seconds": seconds, "write_tokens_per_s": tokens / min(seconds),
                       "forward_tokens_per_s": rate, **storage_error(cache, source, outputs)}  # fmt: skip
            if outputs.get("k") == 64:
                row["target_met"] = row["bytes_per_token"] <= TARGET_BYTES
            out.append(row)
            console.print(f"  bytes: {who}, V={source.vocab_size}, {label}: {row['bytes_per_token']:.1f} B/token, "
                          f"{row['write_tokens_per_s']:,.0f} tok/s")  # fmt: skip
    note = None if trained is not None else "no trained lm-kd teacher yet: run the quality part for its rows"
    return {"blocks": len(rows), "positions_per_row": source.positions, "write_batch": WRITE_BATCH,
            "write_repeats": args.repeats, "rows": out,
            "distillkit_bytes_per_token": DISTILLKIT_BYTES, "target_bytes_per_token": TARGET_BYTES, "note": note}  # fmt: skip


def trained_teacher(record: dict, cfg, tokenizer):
    """``(label, model)``: the lm-kd teacher of the quality part's first seed, from the teacher store
    (None when there is none)."""
    live = record.get("quality", {}).get("per_seed", {}).get(LIVE, {})
    store = TeacherStore(cfg.teacher.cache_dir)
    for seed in sorted(live):
        key = live[seed]["teacher"]["cache_key"]
        if store.has(key):
            model = build_causal_lm(cfg.teacher.model, len(tokenizer), tokenizer)
            store.load(key, model)
            return f"trained (lm-kd seed {seed})", model.eval()
    return None


# ---- quality --------------------------------------------------------------------------------------


def quality_overrides(args) -> list[str]:
    out = ["baseline.enabled=false", "train.eval_every=0"]
    if args.quick:
        out += ["data.max_train_blocks=256", "teacher.train.steps=30", "train.steps=20"]
    return out


def part_quality(args, record: dict, save, console: Console) -> dict:
    q = record.setdefault("quality", {})
    per_seed = q.setdefault("per_seed", {})
    arms = quality_arms((8,) if args.quick else (8, 32, 64))
    q.update(overrides=quality_overrides(args), arms=arms, seeds=args.seeds)
    for seed in args.seeds:
        for arm, outputs in arms.items():
            if seed in per_seed.get(arm, {}):
                continue
            slug = "".join(c if c.isalnum() else "-" for c in arm).strip("-")
            extra = (
                [] if outputs is None else ["teacher.source=cache", f"teacher.outputs={json.dumps(outputs)}"]
            )
            overrides = [*q["overrides"], *extra, f"seeds=[{seed}]", f"output.root={args.runs}",
                         f"name=teacher-cache-{slug}"]  # fmt: skip
            console.rule(f"quality: {arm}, seed {seed}")
            result = ds.run(ds.load_config("lm-kd", overrides), console=console, progress=False)
            r, t = result.arms["distilled"][seed], result.teachers[seed]
            per_seed.setdefault(arm, {})[seed] = {
                "metrics": r["metrics"], "seconds": r["seconds"], "steps": r["steps"],
                "teacher_calls": r.get("teacher_calls"), "run_dir": str(result.run_dir),
                "teacher": {"cache_key": t.get("cache_key"), "metrics": t["metrics"]},
            }  # fmt: skip
            save()
    q["summary"] = quality_summary(per_seed, arms)
    return q


def quality_summary(per_seed: dict, arms: dict) -> dict:
    live = {s: r["metrics"]["perplexity"] for s, r in per_seed.get(LIVE, {}).items()}
    live_stat = mean_std(list(live.values()))
    out = {}
    for arm in arms:
        by_seed = per_seed.get(arm, {})
        if not by_seed:
            continue
        ppl = {s: r["metrics"]["perplexity"] for s, r in by_seed.items()}
        row = {
            key: mean_std([r["metrics"][key] for r in by_seed.values()])
            for key in ("perplexity", "agreement")
        }
        row["train_seconds_per_seed"] = statistics.fmean(r["seconds"] for r in by_seed.values())
        if arm != LIVE and live:
            d = paired_difference(ppl, live)
            row["ppl_vs_live"] = {**d, "better": sum(v < 0 for v in d["per_seed"].values())}
            if arms[arm].get("k") == 64 or arm == "cache dense fp32":
                gap = row["perplexity"]["mean"] - live_stat["mean"]
                row["within_live_std"] = {"gap": gap, "live_std": live_stat["std"], "seeds": live_stat["n"],
                                          "met": abs(gap) <= live_stat["std"] if live_stat["n"] > 1 else None}  # fmt: skip
        out[arm] = row
    return out


# ---- steps ----------------------------------------------------------------------------------------


class Variant:
    """One kind of training step: its own student (same initial weights), objective, teacher, optimizer."""

    def __init__(self, student, adapter, objective, teacher, optimizer_cfg) -> None:
        self.model, self.adapter, self.objective, self.teacher = student, adapter, objective, teacher
        self.optimizer = build_optimizer(student.parameters(), optimizer_cfg)
        self.times: list[float] = []

    def step(self, batch) -> None:
        """As :func:`distillery.train.fit` does one step of one micro-batch."""
        t0 = time.perf_counter()
        target, mask = self.adapter.rows(batch)
        counts = self.objective.counts(target, mask)
        s_out = self.adapter.forward(self.model, batch)
        t_out = self.teacher(batch, s_out) if self.objective.needs_teacher else None
        inputs = LossInputs(
            student_logits=s_out.logits, target=target, mask=mask,
            teacher_logits=None if t_out is None else t_out.logits, student_features=s_out.features,
            teacher_features={} if t_out is None else t_out.features,
        )  # fmt: skip
        self.objective.total(self.objective(inputs, counts), 0.0).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def time_steps(setup: dict, rounds: int, per_round: int, console: Console, name: str) -> dict:
    """Round-robin over the variants: a warm-up round, then ``rounds`` rounds of ``per_round`` steps
    each; every variant sees the same batches. The median ms/step and its ratio to the CE step."""
    rows, student, adapter, optimizer_cfg = (
        setup["rows"],
        setup["student"],
        setup["adapter"],
        setup["optimizer"],
    )
    variants = {label: Variant(copy.deepcopy(student), adapter, build_objective(loss), teacher, optimizer_cfg)
                for label, (loss, teacher) in setup["variants"].items()}  # fmt: skip
    for v in variants.values():
        v.model.train()
    g = torch.Generator().manual_seed(0)
    size = setup["batch_size"]
    batches = [rows.get_batch(torch.randperm(len(rows), generator=g)[:size]) for _ in range(per_round * 2)]
    for r in range(rounds + 1):
        for v in variants.values():
            for i in range(per_round):
                v.step(batches[(r * per_round + i) % len(batches)])
            if r == 0:
                v.times.clear()  # the warm-up round
    ce = statistics.median(variants["CE step"].times)
    out = {}
    for label, v in variants.items():
        ms = statistics.median(v.times) * 1e3
        out[label] = {"ms_per_step": ms, "ratio_to_ce": ms / (ce * 1e3), "steps_timed": len(v.times),
                      "times_ms": [t * 1e3 for t in v.times]}  # fmt: skip
        console.print(f"  steps, {name}: {label}: {ms:.1f} ms/step ({out[label]['ratio_to_ce']:.2f}x CE)")
    return out


def lm_setup(pool: int, tmp: Path) -> dict:
    cfg, tokenizer, rows = austen_rows(pool)
    torch.manual_seed(0)
    student = build_causal_lm(cfg.student, len(tokenizer), tokenizer)
    teacher = build_causal_lm(cfg.teacher.model, len(tokenizer), tokenizer)
    source = lm_source(teacher, rows, tokenizer)
    adapter = HFCausalLMAdapter()  # lm-kd: no chunked loss at 32 x 64 tokens x 1,024 ids

    def cached(name: str, outputs: dict) -> OutputCacheTeacher:
        cache = write_cache(tmp / name, source, outputs)[0]
        return OutputCacheTeacher(cache, positions=lambda batch: batch["input_ids"].shape[1] - 1)

    kd = dict(cfg.loss)
    variants = {"CE step": ({"ce": CrossEntropyConfig()}, None),
                "KD step, cached top-k+tail k=64 fp16": (kd, cached("topk", {"kind": "topk", "k": 64, "values": "fp16"})),
                "KD step, cached dense fp32": (kd, cached("dense", {"kind": "dense", "values": "fp32"})),
                "KD step, live teacher": (kd, FrozenTeacher(teacher, adapter))}  # fmt: skip
    info = {
        "recipe": "lm-kd",
        "batch": f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens",
        "rows": len(rows),
    }
    return {"rows": rows, "student": student, "adapter": adapter, "optimizer": cfg.train.optimizer,
            "variants": variants, "batch_size": cfg.train.batch_size, "info": info}  # fmt: skip


def classification_setup(pool: int, tmp: Path) -> dict:
    recipe = "fashion-mnist-kd" if find_files() is not None else "digits-kd"
    cfg = ds.load_config(recipe)
    data = load_classification_data(cfg.data, 0)
    rows = data.distillation_set()
    rows = rows.subset(torch.arange(min(pool, len(rows))))
    shape, classes = data.input_shape, data.num_classes
    torch.manual_seed(0)
    student = build_model(cfg.student, shape, classes, "student")
    members = [
        build_model(cfg.teacher.model, shape, classes, "teacher.model") for _ in range(cfg.teacher.ensemble)
    ]
    teacher = Ensemble(members)
    adapter = ClassifierAdapter()
    source = OutputSource(dataset=rows, forward=FrozenTeacher(teacher, adapter), keys=("x",), vocab_size=classes,
                          identity={"task": "classification", "teacher": weights_sha256(teacher), "tokenizer": None})  # fmt: skip
    cache = write_cache(tmp / "dense", source, {"kind": "dense", "values": "fp32"})[0]
    kd = dict(cfg.loss)
    variants = {"CE step": ({"ce": CrossEntropyConfig()}, None),
                "KD step, cached dense fp32": (kd, OutputCacheTeacher(cache)),
                "KD step, live teacher": (kd, FrozenTeacher(teacher, adapter))}  # fmt: skip
    info = {"recipe": recipe, "data": data.name, "batch": cfg.train.batch_size, "rows": len(rows),
            "teacher_members": cfg.teacher.ensemble}  # fmt: skip
    return {"rows": rows, "student": student, "adapter": adapter, "optimizer": cfg.train.optimizer,
            "variants": variants, "batch_size": cfg.train.batch_size, "info": info}  # fmt: skip


def part_steps(args, console: Console) -> dict:
    out = {"rounds": args.rounds, "steps_per_round": args.steps_per_round, "threads": torch.get_num_threads()}
    for name, build, pool in (("lm", lm_setup, args.blocks), ("classification", classification_setup, 4096)):
        with tempfile.TemporaryDirectory(prefix="teacher-cache-steps-") as tmp:
            setup = build(pool, Path(tmp))
            times = time_steps(setup, args.rounds, args.steps_per_round, console, name)
        out[name] = {**setup["info"], "variants": times}
    ratio = out["lm"]["variants"]["KD step, cached top-k+tail k=64 fp16"]["ratio_to_ce"]
    out["target"] = {"ratio": ratio, "needed": TARGET_STEP_RATIO, "met": ratio <= TARGET_STEP_RATIO}
    return out


# ---- report ---------------------------------------------------------------------------------------


def verdict(met) -> str:
    return "n/a (one seed)" if met is None else ("met" if met else "missed")


def num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"


def markdown(record: dict) -> str:
    lines: list[str] = []
    b = record.get("bytes")
    if b:
        lines += [f"**bytes** ({b['blocks']} blocks x {b['positions_per_row']} positions, written {b['write_batch']} rows per forward):", "",
                  "| teacher | vocab | setting | B/token | write tok/s | forward tok/s | logp MAE | max err | tail mass "
                  "| distinct ids | dense KL |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in b["rows"]:
            cells = [r["teacher"], f"{r['vocab']:,}", r["setting"], f"{r['bytes_per_token']:.1f}",
                     f"{r['write_tokens_per_s']:,.0f}", f"{r['forward_tokens_per_s']:,.0f}"]  # fmt: skip
            cells += [
                num(r.get(k)) for k in ("logp_mae", "logp_max_err", "tail_mass", "distinct_ids", "dense_kl")
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"DistillKit (Arcee AI) reports about {b['distillkit_bytes_per_token']} B/token at its recommended "
                  "offline settings (their figure, not measured here).", ""]  # fmt: skip
        for r in b["rows"]:
            if "target_met" in r:
                lines.append(f"- {r['setting']}, {r['teacher']}, V={r['vocab']:,}: {r['bytes_per_token']:.1f} B/token "
                             f"(target <= {b['target_bytes_per_token']}): {verdict(r['target_met'])}")  # fmt: skip
        if b.get("note"):
            lines.append(f"- note: {b['note']}")
        lines.append("")
    q = record.get("quality", {}).get("summary")
    if q:
        n = len(record["quality"]["seeds"])
        lines += [f"**quality** (lm-kd, test split, mean ± std over {n} seed(s); Δ = paired difference to the live "
                  "teacher, better = seeds with lower perplexity):", "",
                  "| arm | perplexity | agreement % | Δ perplexity vs live | better | train s / seed |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for arm, r in q.items():
            d = r.get("ppl_vs_live")
            delta, better = ("-", "-") if d is None else (fmt(d, 3, signed=True), f"{d['better']}/{d['n']}")
            lines.append(f"| {arm} | {fmt(r['perplexity'])} | {fmt(r['agreement'], 1)} | {delta} | {better} "
                         f"| {r['train_seconds_per_seed']:.0f} |")  # fmt: skip
        lines.append("")
        for arm, r in q.items():
            w = r.get("within_live_std")
            if w:
                what = (
                    "dense cache vs live" if "dense" in arm else f"{arm} within one std of the live teacher"
                )
                lines.append(f"- {what}: mean perplexity {w['gap']:+.4f} vs the live arm's std over seeds "
                             f"{w['live_std']:.4f}: {verdict(w['met'])}")  # fmt: skip
            if arm == "cache dense fp32" and r.get("ppl_vs_live"):
                diffs = r["ppl_vs_live"]["per_seed"].values()
                lines.append(
                    f"- cache dense fp32 - live, largest per-seed |Δ perplexity|: {max(map(abs, diffs)):.2e}"
                )
        lines.append("")
    s = record.get("steps")
    if s:
        lm, cl = s["lm"], s["classification"]
        lines += [f"**steps** (median ms/step, round-robin: {s['rounds']} rounds x {s['steps_per_round']} steps after a "
                  f"warm-up round, {s['threads']} torch thread(s)): LM {lm['recipe']} ({lm['batch']}); classification "
                  f"{cl['recipe']} ({cl['data']}, batch {cl['batch']}):", "",
                  "| step | LM ms | LM x CE | classification ms | classification x CE |", "|---|---|---|---|---|"]  # fmt: skip
        for label in lm["variants"]:
            a, c = lm["variants"][label], cl["variants"].get(label)
            cc = (
                ["n/a (10 classes)", "-"]
                if c is None
                else [f"{c['ms_per_step']:.2f}", f"{c['ratio_to_ce']:.2f}"]
            )
            lines.append(f"| {label} | {a['ms_per_step']:.1f} | {a['ratio_to_ce']:.2f} | {cc[0]} | {cc[1]} |")
        t = s["target"]
        lines += ["", f"- LM cached sparse KD step {t['ratio']:.2f}x the CE step (target <= {t['needed']}): "
                  f"{verdict(t['met'])}"]  # fmt: skip
    return "\n".join(lines).rstrip()


def machine(threads: int) -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "DISTILLERY_CACHE": os.environ.get("DISTILLERY_CACHE")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="quality seeds (default 0 1 2; --quick: 0)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the caches")
    p.add_argument("--resume", action="store_true", help="keep the saved quality runs and other parts")
    p.add_argument("--threads", type=int, default=1, help="torch threads, every part (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="writes per bytes setting, the fastest counts (default 2; --quick: 1)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.blocks = 64 if args.quick else 512
    args.rounds, args.steps_per_round = (3, 2) if args.quick else (20, 5)
    args.repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    console = Console()
    stem = "teacher_cache" + ("-quick" if args.quick else "")
    settings = {
        "benchmark": "teacher_cache",
        "quick": args.quick,
        "quality_overrides": quality_overrides(args),
    }
    record = dict(settings)
    if args.resume:
        record = saved_record(args.out / f"{stem}.json", settings) or record
        for by_seed in record.get("quality", {}).get("per_seed", {}).values():  # JSON keys are strings
            for s in list(by_seed):
                by_seed[int(s)] = by_seed.pop(s)
        console.print(f"resuming: kept {', '.join(k for k in PARTS if k in record) or 'nothing'}")
    t0, earlier = time.perf_counter(), float(record.get("seconds", 0.0))

    def save() -> None:
        record.update(parts=args.parts, machine=machine(args.threads), seconds=earlier + time.perf_counter() - t0,
                      command="python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:] if argv is None else argv))  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
        (args.out / f"{stem}.md").write_text(markdown(record) + "\n")

    # quality first: the bytes part measures its trained teacher too
    for part in sorted(args.parts, key=["quality", "bytes", "steps"].index):
        console.rule(part)
        started = time.perf_counter()
        if part == "quality":
            part_quality(args, record, save, console)
        else:
            record[part] = part_bytes(args, record, console) if part == "bytes" else part_steps(args, console)
        record[part]["seconds"] = time.perf_counter() - started
        save()
    print(markdown(record))
    console.print(f"{time.perf_counter() - t0:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
