"""Teacher-output caches (``teacher.source: cache``): bytes per token, student quality, step time.

Three parts, selectable with ``--parts bytes quality steps`` (default: all three).

**bytes** -- what :func:`distillery.cache.write_outputs` stores, and how fast. A Llama teacher of
lm-kd's size (hidden 128, 2 layers, 4 heads; :func:`~distillery.models.causal_lm.build_causal_lm`,
random init, seed 0) runs over the first 512 training blocks of 64 tokens of the Austen corpus
(lm-kd's bpe tokenizer of 1,024 ids), with a head of 1,024 rows and one of 32,768 rows (the same
token ids: a padded vocabulary). Each setting is written to a temporary folder (removed after):
dense fp16 logits; top-k + tail at k = 8, 32, 64 (fp16 log-probabilities; int8 at k = 64 too);
sampled at k = 8, 32, 64 (k draws; fp16; int8 at k = 64 too). **B/token** = the bytes of all shard
files / the stored positions (rows x 63): ids, values, tail mass or counts, the row index and the
safetensors headers, all counted. A cache has a fixed size per position, set by its settings and the
vocabulary, so the random weights give the bytes a trained teacher would. **write tok/s** = stored
positions / the seconds of ``write_outputs`` (teacher forward, compression, shard files, checksums;
the fastest of ``--repeats`` writes), beside **forward tok/s**, the teacher's forward alone over the
same rows. The stored values are read back through :class:`~distillery.cache.OutputCache` and
compared with the teacher's fp32 log-probabilities at the kept ids: **logp MAE** / **max err** (mean
/ largest absolute error over the kept slots; sampled: the slots with draws), **tail mass** (top-k:
the mean probability outside the k ids), **distinct ids** (sampled: mean ids drawn per token),
**dense KL** (dense: the mean KL(p_fp32 || p_stored) per token). These depend on the teacher's
distribution, and a random teacher's is nearly uniform: the same rows are measured again (1,024 ids)
with the lm-kd teacher the quality part trained (this run's, or the saved JSON's with ``--resume``).
Reference: DistillKit (Arcee AI, github.com/arcee-ai/DistillKit) reports about 300 B/token at its
recommended offline settings; that figure is theirs, not measured here. Target: <= 300 B/token at
k = 64, ids included.

**quality** -- the lm-kd recipe (Austen, bpe 1,024, seq_len 64, 8,000 training blocks, the 2-layer
teacher trained 1,500 steps and kept in the teacher store, the student 800 steps, 0.5 CE + 0.5
forward KL) with ``baseline.enabled=false`` and ``train.eval_every=0``, seeds 0, 1, 2, one run per arm
and seed (:func:`distillery.load_config` + :func:`distillery.run`): the live dense teacher (lm-kd as
it is), a dense fp32 cache, top-k + tail (fp16) and sampled (fp16) caches at k = 8, 32, 64. Reported:
test perplexity and top-1 agreement with the teacher, mean ± std over seeds; the paired difference in
perplexity to the live teacher (mean ± std of the per-seed differences; "better": seeds where the arm's
perplexity is lower). Target ("sampled or top-k+tail at k = 64 within one standard deviation of the
dense teacher"): |mean perplexity of the arm - that of the live arm| <= the std over seeds of the
live arm's perplexity. The dense fp32 cache should train exactly as the live teacher does: the largest
per-seed difference is reported. Teachers and caches go under ``DISTILLERY_CACHE`` (default
~/.cache/distillery): from an empty one each seed's teacher is trained by its first run and each cache
written by the first run that reads it (the dense fp32 caches take about 2 GB per seed).

**steps** -- one training step (the student's forward, the teacher's outputs: a live forward or a
cache lookup, the loss, backward, the optimizer step), timed in one process, round-robin over the
variants (a warm-up round, then ``rounds`` rounds of a few steps of each; the same batches for each;
the median ms/step): a CE step, a KD step from a top-k + tail cache (k = 64, fp16), from a dense fp32
cache, and with the live teacher. Language model: lm-kd's student and teacher (random init: the time
does not depend on the weights), batches of 32 x 64 tokens, the recipe's loss. Classification:
fashion-mnist-kd's CNN teacher and MLP student when the Fashion-MNIST files are present, else
digits-kd's (a 2-CNN ensemble, an MLP) on scikit-learn digits; the recipe's batch size and loss; no
top-k row (10 classes). Each step is made of the library's adapter, objective and teacher objects as
:func:`distillery.train.fit` calls them (without its bookkeeping, which is the same for every
variant). Reported: ms/step and the ratio to the CE step. Target: the LM's cached sparse KD step <=
1.15x its CE step.

Torch runs with ``--threads`` threads (default 1) in every part: on a shared 2-core machine two
threads stall whenever another process holds a core (steps 3-6x slower, at random).

    python benchmarks/teacher_cache.py                       # all three parts, 3 seeds
    python benchmarks/teacher_cache.py --quick               # a smoke test of the script (a few minutes)
    python benchmarks/teacher_cache.py --parts bytes steps   # only these parts
    python benchmarks/teacher_cache.py --resume              # keep the saved quality runs, run the rest

``--quick``: 64 blocks (bytes, steps), one write per setting; quality with seed 0,
``data.max_train_blocks=256``, ``teacher.train.steps=30``, ``train.steps=20`` and the k = 8 arms only;
3 rounds of 2 steps. Without ``--resume`` the results hold the parts run now; with it the saved
record's finished quality runs and its other parts are kept (its settings must match). Full run:
about 54 minutes on a 2-core CPU from an empty cache (quality 42, bytes 11, steps 1; one thread).

Writes ``benchmarks/results/teacher_cache.json`` (every number, the settings and the machine) and
``teacher_cache.md`` (the tables), ``teacher_cache-quick.*`` with ``--quick``, in ``--out``.
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
TARGET_BYTES = 300  # the target at k = 64, ids included
TARGET_STEP_RATIO = 1.15  # the LM's cached sparse KD step / its CE step
WRITE_BATCH = 32  # rows per teacher forward when writing (lm-kd's eval.batch_size, the task's default)
BIG_VOCAB = 32768
LIVE, DENSE = "live dense teacher", "cache dense fp32"
SPARSE_STEP = "KD, cached top-k+tail k=64 fp16"


def sparse(kind: str, ks, values: str = "fp16") -> dict[str, dict]:
    name = {"topk": "top-k+tail", "sampled": "sampled"}[kind]
    return {f"{name} k={k} {values}": {"kind": kind, "k": k, "values": values} for k in ks}


BYTE_SETTINGS = {
    "dense fp16": {"kind": "dense", "values": "fp16"},
    **sparse("topk", (8, 32, 64)),
    **sparse("topk", (64,), "int8"),
    **sparse("sampled", (8, 32, 64)),
    **sparse("sampled", (64,), "int8"),
}


def quality_arms(ks) -> dict[str, dict | None]:
    """arm -> its teacher.outputs (None: the live teacher)."""
    dense = {"kind": "dense", "values": "fp32"}
    return {LIVE: None, DENSE: dense, **sparse("topk", ks), **sparse("sampled", ks)}


# ---- shared helpers -------------------------------------------------------------------------------


def austen_rows(n: int):
    """lm-kd's config, its tokenizer and the first ``n`` of its training blocks."""
    cfg = ds.load_config("lm-kd")
    splits = split_austen()
    tokenizer = cfg.data.tokenizer.build(list(splits.train))
    train = lm_datasets(splits, tokenizer, cfg.data.seq_len, names=("train",))["train"]
    return cfg, tokenizer, train.subset(torch.arange(min(n, len(train))))


def lm_source(model, rows, tokenizer) -> OutputSource:
    """What the LM task hands the cache writer (``LMTask.output_source``), for ``rows``."""
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
    """``(the cache, the seconds of each write)``: written ``repeats`` times, each into an empty folder."""
    seconds = []
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        write_outputs(folder, source, OutputsConfig(**outputs), batch_size=WRITE_BATCH)
        seconds.append(time.perf_counter() - t0)
    return OutputCache(folder, verify=False), seconds


def batches_of(dataset, size: int = WRITE_BATCH):
    for start in range(0, len(dataset), size):
        yield dataset.get_batch(torch.arange(start, min(start + size, len(dataset))))


# ---- bytes ----------------------------------------------------------------------------------------


def storage_error(cache: OutputCache, source: OutputSource, kind: str) -> dict[str, float]:
    """The stored values, read back, against the teacher's fp32 outputs on the same rows."""
    tot = dict.fromkeys(("err", "max", "slots", "tokens", "tail", "kl"), 0.0)
    for batch in batches_of(source.dataset):
        ref = source.forward(batch).logits  # [B, T, V] float32
        keep = source.valid(batch)  # [B, T]
        got = {k: v[:, : ref.shape[1]] for k, v in cache.lookup(batch["index"]).items()}
        tot["tokens"] += float(keep.sum())
        if kind == "dense":
            tot["kl"] += float(DF.forward_kl(got["logits"], ref, mask=keep, reduction="sum"))
            continue
        exact = ref.log_softmax(-1).gather(-1, got["ids"])  # the caches' temperature: 1
        slot = keep.unsqueeze(-1).expand_as(exact)
        if kind == "sampled":
            slot = slot & (got["weights"] > 0)
        err = (got["logp"] - exact).abs()[slot]
        tot["err"], tot["slots"] = tot["err"] + float(err.sum()), tot["slots"] + float(slot.sum())
        tot["max"] = max(tot["max"], float(err.max()))
        if kind == "topk":
            tot["tail"] += float(got["tail"][keep].sum())
    n = tot["tokens"]
    if kind == "dense":
        return {"dense_kl": tot["kl"] / n}
    out = {"logp_mae": tot["err"] / tot["slots"], "logp_max_err": tot["max"]}
    out.update({"tail_mass": tot["tail"] / n} if kind == "topk" else {"distinct_ids": tot["slots"] / n})
    return out


def forward_rate(source: OutputSource) -> float:
    """Positions per second of the teacher's forward alone over the rows (after a warm-up batch)."""
    source.forward(source.dataset.get_batch(torch.arange(WRITE_BATCH)))
    t0 = time.perf_counter()
    for batch in batches_of(source.dataset):
        source.forward(batch)
    return len(source.dataset) * source.positions / (time.perf_counter() - t0)


def trained_teacher(record: dict, cfg, tokenizer):
    """``(label, model)``: the lm-kd teacher of the quality part's first seed, from the teacher store;
    None when there is none."""
    live = record.get("quality", {}).get("per_seed", {}).get(LIVE, {})
    store = TeacherStore(cfg.teacher.cache_dir)
    for seed in sorted(live):
        key = live[seed]["teacher"]["cache_key"]
        if store.has(key):
            model = build_causal_lm(cfg.teacher.model, len(tokenizer), tokenizer)
            store.load(key, model)
            return f"trained (lm-kd seed {seed})", model.eval()
    return None


def part_bytes(args, record: dict, console: Console) -> dict:
    cfg, tokenizer, rows = austen_rows(args.blocks)
    teachers = []
    for vocab in (len(tokenizer), BIG_VOCAB):
        torch.manual_seed(0)
        model_cfg = cfg.teacher.model.model_copy(update={"vocab_size": vocab})
        teachers.append(("random init", build_causal_lm(model_cfg, len(tokenizer), tokenizer)))
    trained = trained_teacher(record, cfg, tokenizer)
    teachers += [trained] if trained is not None else []
    out = []
    for who, model in teachers:
        source = lm_source(model, rows, tokenizer)
        tokens, rate = len(rows) * source.positions, forward_rate(source)
        for label, outputs in BYTE_SETTINGS.items():
            with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
                cache, seconds = write_cache(Path(tmp) / "cache", source, outputs, args.repeats)
                row = {"teacher": who, "vocab": source.vocab_size, "setting": label, **outputs,
                       "bytes": cache.nbytes(), "tokens": tokens, "bytes_per_token": cache.nbytes() / tokens,
                       "write_seconds": seconds, "write_tokens_per_s": tokens / min(seconds),
                       "forward_tokens_per_s": rate}  # fmt: skip
                row.update(storage_error(cache, source, outputs["kind"]))
            if outputs.get("k") == 64:
                row["target_met"] = row["bytes_per_token"] <= TARGET_BYTES
            out.append(row)
            console.print(
                f"  bytes: {who}, V={source.vocab_size:,}, {label}: {row['bytes_per_token']:.1f} B/token, "
                f"{row['write_tokens_per_s']:,.0f} tok/s"
            )
    return {
        "blocks": len(rows),
        "positions_per_row": source.positions,
        "write_batch": WRITE_BATCH,
        "write_repeats": args.repeats,
        "rows": out,
        "distillkit_bytes_per_token": DISTILLKIT_BYTES,
        "target_bytes_per_token": TARGET_BYTES,
        "note": None if trained else "no trained lm-kd teacher yet: the quality part trains it",
    }


# ---- quality --------------------------------------------------------------------------------------


def quality_overrides(quick: bool) -> list[str]:
    out = ["baseline.enabled=false", "train.eval_every=0"]
    return out + (["data.max_train_blocks=256", "teacher.train.steps=30", "train.steps=20"] if quick else [])


def part_quality(args, record: dict, save, console: Console) -> dict:
    """One run per arm and seed; each finished one is saved at once and skipped by ``--resume``."""
    q = record.setdefault("quality", {})
    per_seed = q.setdefault("per_seed", {})
    arms = quality_arms((8,) if args.quick else (8, 32, 64))
    q.update(overrides=quality_overrides(args.quick), arms=arms)
    for seed in args.seeds:
        for arm, outputs in arms.items():
            if seed in per_seed.get(arm, {}):
                continue
            slug = "".join(c if c.isalnum() else "-" for c in arm)
            cache = (
                [] if outputs is None else ["teacher.source=cache", f"teacher.outputs={json.dumps(outputs)}"]
            )
            overrides = [*q["overrides"], *cache, f"seeds=[{seed}]", f"output.root={args.runs}",
                         f"name=teacher-cache-{slug}"]  # fmt: skip
            console.rule(f"quality: {arm}, seed {seed}")
            result = ds.run(ds.load_config("lm-kd", overrides), console=console, progress=False)
            r, t = result.arms["distilled"][seed], result.teachers[seed]
            per_seed.setdefault(arm, {})[seed] = {
                "metrics": r["metrics"], "seconds": r["seconds"], "steps": r["steps"],
                "teacher_calls": r.get("teacher_calls"), "run_dir": str(result.run_dir),
                "teacher": {"cache_key": t.get("cache_key"), "metrics": t["metrics"]},
            }  # fmt: skip
            q["summary"] = quality_summary(per_seed, arms)
            save()
    q["summary"] = quality_summary(per_seed, arms)
    return q


def quality_summary(per_seed: dict, arms: dict) -> dict:
    live = {s: r["metrics"]["perplexity"] for s, r in per_seed.get(LIVE, {}).items()}
    base = mean_std(list(live.values()))
    out = {}
    for arm, outputs in arms.items():
        by_seed = per_seed.get(arm, {})
        if not by_seed:
            continue
        row = {k: mean_std([r["metrics"][k] for r in by_seed.values()]) for k in ("perplexity", "agreement")}
        row["train_seconds_per_seed"] = statistics.fmean(r["seconds"] for r in by_seed.values())
        if outputs is not None and live:
            d = paired_difference({s: r["metrics"]["perplexity"] for s, r in by_seed.items()}, live)
            row["ppl_vs_live"] = {**d, "better": sum(v < 0 for v in d["per_seed"].values())}
            if arm == DENSE or outputs.get("k") == 64:
                gap = row["perplexity"]["mean"] - base["mean"]
                met = abs(gap) <= base["std"] if base["n"] > 1 else None  # one seed: no std
                row["within_live_std"] = {"gap": gap, "live_std": base["std"], "seeds": base["n"], "met": met}
        out[arm] = row
    return out


# ---- steps ----------------------------------------------------------------------------------------


class Variant:
    """One kind of training step: its own student (the same initial weights), objective, teacher and
    optimizer, and the seconds of each step it took."""

    def __init__(self, student, adapter, objective, teacher, optimizer_cfg) -> None:
        self.model, self.adapter, self.objective, self.teacher = student, adapter, objective, teacher
        self.optimizer = build_optimizer(student.parameters(), optimizer_cfg)
        self.model.train()
        self.times: list[float] = []

    def step(self, batch) -> None:
        """One step of one micro-batch, as :func:`distillery.train.fit` makes it."""
        t0 = time.perf_counter()
        target, mask = self.adapter.rows(batch)
        counts = self.objective.counts(target, mask)
        s_out = self.adapter.forward(self.model, batch)
        t_out = self.teacher(batch, s_out) if self.objective.needs_teacher else None
        inputs = LossInputs(
            student_logits=s_out.logits, target=target, mask=mask, student_features=s_out.features,
            teacher_logits=None if t_out is None else t_out.logits,
            teacher_features={} if t_out is None else t_out.features,
        )  # fmt: skip
        self.objective.total(self.objective(inputs, counts), 0.0).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def time_steps(setup: dict, rounds: int, per_round: int, console: Console, name: str) -> dict:
    """Round-robin over the variants: a warm-up round, then ``rounds`` rounds of ``per_round`` steps of
    each, on the same batches. The median ms/step and its ratio to the CE step's."""
    variants = {
        label: Variant(copy.deepcopy(setup["student"]), setup["adapter"], build_objective(loss), teacher,
                       setup["optimizer"])
        for label, (loss, teacher) in setup["variants"].items()
    }  # fmt: skip
    rows, g = setup["rows"], torch.Generator().manual_seed(0)
    batches = [
        rows.get_batch(torch.randperm(len(rows), generator=g)[: setup["batch_size"]]) for _ in range(8)
    ]
    for r in range(rounds + 1):
        for v in variants.values():
            for i in range(per_round):
                v.step(batches[(r * per_round + i) % len(batches)])
            if r == 0:
                v.times.clear()  # the warm-up round
    ce = statistics.median(variants["CE"].times)
    out = {}
    for label, v in variants.items():
        ms, ratio = statistics.median(v.times) * 1e3, statistics.median(v.times) / ce
        out[label] = {"ms_per_step": ms, "ratio_to_ce": ratio, "times_ms": [t * 1e3 for t in v.times]}
        console.print(f"  steps, {name}: {label}: {ms:.1f} ms/step ({ratio:.2f}x CE)")
    return out


def step_setup(rows, student, teacher, adapter, source, cfg, sparse_step: bool, tmp: Path, info: dict):
    """The variants of one model pair: CE; KD from caches (written to ``tmp``); KD from the live teacher."""

    def cached(outputs: dict) -> OutputCacheTeacher:
        cache = write_cache(tmp / outputs["kind"], source, outputs)[0]
        positions = None if source.positions is None else (lambda batch: batch["input_ids"].shape[1] - 1)
        return OutputCacheTeacher(cache, positions=positions)

    kd = dict(cfg.loss)
    variants = {"CE": ({"ce": CrossEntropyConfig()}, None)}
    if sparse_step:
        variants[SPARSE_STEP] = (kd, cached({"kind": "topk", "k": 64, "values": "fp16"}))
    variants["KD, cached dense fp32"] = (kd, cached({"kind": "dense", "values": "fp32"}))
    variants["KD, live teacher"] = (kd, FrozenTeacher(teacher, adapter))
    return {"rows": rows, "student": student, "adapter": adapter, "optimizer": cfg.train.optimizer,
            "batch_size": cfg.train.batch_size, "variants": variants,
            "info": {**info, "batch_size": cfg.train.batch_size, "rows": len(rows)}}  # fmt: skip


def lm_setup(pool: int, tmp: Path) -> dict:
    cfg, tokenizer, rows = austen_rows(pool)
    torch.manual_seed(0)
    student = build_causal_lm(cfg.student, len(tokenizer), tokenizer)
    teacher = build_causal_lm(cfg.teacher.model, len(tokenizer), tokenizer)
    # lm-kd computes the loss from full logits (32 x 64 tokens x 1,024 ids: below chunked_loss.threshold)
    adapter = HFCausalLMAdapter()
    info = {"recipe": "lm-kd", "tokens_per_row": cfg.data.seq_len}
    return step_setup(
        rows, student, teacher, adapter, lm_source(teacher, rows, tokenizer), cfg, True, tmp, info
    )


def classification_setup(pool: int, tmp: Path) -> dict:
    recipe = "fashion-mnist-kd" if find_files() is not None else "digits-kd"
    cfg = ds.load_config(recipe)
    data = load_classification_data(cfg.data, 0)
    rows = data.distillation_set()
    rows = rows.subset(torch.arange(min(pool, len(rows))))
    shape, classes = data.input_shape, data.num_classes
    torch.manual_seed(0)
    student = build_model(cfg.student, shape, classes, "student")
    teacher = Ensemble([build_model(cfg.teacher.model, shape, classes) for _ in range(cfg.teacher.ensemble)])
    adapter = ClassifierAdapter()
    identity = {"task": "classification", "teacher": weights_sha256(teacher), "tokenizer": None}
    source = OutputSource(rows, FrozenTeacher(teacher, adapter), ("x",), classes, identity)
    info = {"recipe": recipe, "data": data.name, "teacher_members": cfg.teacher.ensemble}
    return step_setup(rows, student, teacher, adapter, source, cfg, False, tmp, info)


def part_steps(args, console: Console) -> dict:
    out = {"rounds": args.rounds, "steps_per_round": args.steps_per_round, "threads": torch.get_num_threads()}
    for name, build, pool in (("lm", lm_setup, args.blocks), ("classification", classification_setup, 4096)):
        with tempfile.TemporaryDirectory(prefix="teacher-cache-steps-") as tmp:
            setup = build(pool, Path(tmp))
            out[name] = {**setup["info"], "variants": time_steps(setup, args.rounds, args.steps_per_round,
                                                                 console, name)}  # fmt: skip
    ratio = out["lm"]["variants"][SPARSE_STEP]["ratio_to_ce"]
    out["target"] = {"ratio": ratio, "needed": TARGET_STEP_RATIO, "met": ratio <= TARGET_STEP_RATIO}
    return out


# ---- report ---------------------------------------------------------------------------------------


def verdict(met: bool | None) -> str:
    return "n/a (one seed: no std)" if met is None else ("met" if met else "missed")


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.3f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = [head, ["---"] * len(head), *rows]
    return ["| " + " | ".join(cells) + " |" for cells in lines]


BYTES_COLUMNS = {"logp_mae": "logp MAE", "logp_max_err": "max err", "tail_mass": "tail mass",
                 "distinct_ids": "distinct ids", "dense_kl": "dense KL"}  # fmt: skip


def md_bytes(b: dict) -> list[str]:
    head = ["teacher", "vocab", "setting", "B/token", "write tok/s", "forward tok/s", *BYTES_COLUMNS.values()]
    rows = [
        [r["teacher"], f"{r['vocab']:,}", r["setting"], f"{r['bytes_per_token']:.1f}",
         f"{r['write_tokens_per_s']:,.0f}", f"{r['forward_tokens_per_s']:,.0f}",
         *(num(r.get(k)) for k in BYTES_COLUMNS)]
        for r in b["rows"]
    ]  # fmt: skip
    lines = [
        f"**bytes**: {b['blocks']} Austen blocks x {b['positions_per_row']} stored positions, "
        f"{b['write_batch']} rows per teacher forward, the fastest of {b['write_repeats']} write(s):",
        "",
        *table(head, rows),
        "",
        f"DistillKit (Arcee AI) reports about {b['distillkit_bytes_per_token']} B/token at its recommended "
        "offline settings (their figure, not measured here).",
        "",
    ]
    for r in b["rows"]:
        if "target_met" in r:
            lines.append(
                f"- {r['setting']}, V={r['vocab']:,} ({r['teacher']}): {r['bytes_per_token']:.1f} B/token "
                f"(target <= {b['target_bytes_per_token']}): {verdict(r['target_met'])}"
            )
    return lines + ([f"- note: {b['note']}"] if b.get("note") else [])


def md_quality(q: dict) -> list[str]:
    summary = q.get("summary")
    if not summary:
        return []
    rows = []
    for arm, r in summary.items():
        d = r.get("ppl_vs_live")
        delta, better = ("-", "-") if d is None else (fmt(d, 3, signed=True), f"{d['better']}/{d['n']}")
        seconds = f"{r['train_seconds_per_seed']:.0f}"
        rows.append([arm, fmt(r["perplexity"]), fmt(r["agreement"], 1), delta, better, seconds])
    n = summary.get(LIVE, {}).get("perplexity", {}).get("n", 0)
    head = ["arm", "perplexity", "agreement %", "Δ perplexity vs live", "better", "train s / seed"]
    lines = [
        f"**quality**: lm-kd ({', '.join(q['overrides'])}), test split, mean ± std over seeds ({n} for the "
        "live arm); Δ = paired per-seed difference to the live teacher; better = seeds with a lower "
        "perplexity:",
        "",
        *table(head, rows),
        "",
    ]
    for arm, r in summary.items():
        w = r.get("within_live_std")
        if w and arm == DENSE:
            largest = max(map(abs, r["ppl_vs_live"]["per_seed"].values()))
            lines.append(f"- cache dense fp32 - live teacher: largest per-seed |Δ perplexity| {largest:.2e}")
        elif w:
            lines.append(
                f"- {arm} within one std of the live teacher: mean perplexity {w['gap']:+.3f} from the live "
                f"arm's, whose std over {w['seeds']} seeds is {w['live_std']:.3f}: {verdict(w['met'])}"
            )
    if not any(a.get("k") == 64 for a in q["arms"].values() if a):
        lines.append(
            "- target (k = 64 within one std of the live teacher): not measured (no k = 64 arms run)"
        )
    return lines


def md_steps(s: dict) -> list[str]:
    lm, cl = s["lm"], s["classification"]
    rows = []
    for label, a in lm["variants"].items():
        c = cl["variants"].get(label)
        cells = (
            ["n/a (10 classes)", "-"] if c is None else [f"{c['ms_per_step']:.2f}", f"{c['ratio_to_ce']:.2f}"]
        )
        rows.append([label, f"{a['ms_per_step']:.1f}", f"{a['ratio_to_ce']:.2f}", *cells])
    t = s["target"]
    return [
        f"**steps**: median ms/step, round-robin ({s['rounds']} rounds x {s['steps_per_round']} steps of "
        f"each after a warm-up round), {s['threads']} torch thread(s); LM: {lm['recipe']}, "
        f"{lm['batch_size']} x {lm['tokens_per_row']} tokens; classification: {cl['recipe']} ({cl['data']}), "
        f"batch {cl['batch_size']}:",
        "",
        *table(["step", "LM ms", "LM x CE", "classification ms", "classification x CE"], rows),
        "",
        f"- LM cached sparse KD step {t['ratio']:.2f}x the CE step (target <= {t['needed']}): "
        f"{verdict(t['met'])}",
    ]


def markdown(record: dict) -> str:
    shows = {"bytes": md_bytes, "quality": md_quality, "steps": md_steps}
    blocks = [show(record[part]) for part, show in shows.items() if part in record]
    return "\n\n".join("\n".join(b) for b in blocks if b)


def machine(threads: int) -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "DISTILLERY_CACHE_set": "DISTILLERY_CACHE" in os.environ,  # whether, not where (no local paths)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", type=int, nargs="+", help="quality seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the caches")
    p.add_argument("--resume", action="store_true", help="keep the saved quality runs and other parts")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in every part (default 1)")
    p.add_argument(
        "--repeats", type=int, help="writes per bytes setting; the fastest counts (default 2; quick 1)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks", help="the quality runs' folders")
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
        "quality_overrides": quality_overrides(args.quick),
    }
    record = dict(settings)
    if args.resume:
        record = saved_record(args.out / f"{stem}.json", settings) or record
        for by_seed in record.get("quality", {}).get("per_seed", {}).values():  # JSON keys are strings
            for s in list(by_seed):
                by_seed[int(s)] = by_seed.pop(s)
        console.print(f"resuming: kept {', '.join(k for k in PARTS if k in record) or 'nothing'}")
    t0, earlier = time.perf_counter(), float(record.get("seconds", 0.0))
    command = "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def save() -> None:
        record.update(parts=args.parts, seeds=args.seeds, machine=machine(args.threads), command=command,
                      seconds=earlier + time.perf_counter() - t0)  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
        (args.out / f"{stem}.md").write_text(markdown(record) + "\n")

    # quality first: the bytes part measures the teacher it trains, too
    for part in sorted(args.parts, key=["quality", "bytes", "steps"].index):
        console.rule(part)
        started = time.perf_counter()
        if part == "quality":
            part_quality(args, record, save, console)
            record[part]["seconds"] = record[part].get("seconds", 0.0) + time.perf_counter() - started
        else:
            record[part] = part_bytes(args, record, console) if part == "bytes" else part_steps(args, console)
            record[part]["seconds"] = time.perf_counter() - started
        save()
    print(markdown(record))
    console.print(f"{time.perf_counter() - t0:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
