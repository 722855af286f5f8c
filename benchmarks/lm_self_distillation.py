"""Language models that teach themselves: knowledge injection and forgetting, paired over seeds.

* ``injection``: the fact task (``lm-prompt-distill``): closed-book accuracy on held-out phrasings of
  the facts after SFT on the question/answer pairs vs prompt distillation (the same weights, reading
  the passage, as the teacher). Both arms start from the same model, which first learned to read
  passages about *other* invented people.
* ``forgetting``: a small LM trained on Austen (``lm-teacher``), then fine-tuned on the arithmetic
  task by SFT, SDFT (``lm-sdft``: its own verified rewrites) and OPSD (``lm-opsd``: on-policy reverse
  KL to itself shown the gold answer), the same budget each, from the same starting model (the Austen
  model after a short warm-up on the task with the answer in half of its prompts): task exact match
  and Austen test perplexity before and after.

    python benchmarks/lm_self_distillation.py                       # both parts, 3 seeds
    python benchmarks/lm_self_distillation.py --part injection
    python benchmarks/lm_self_distillation.py --quick               # a smoke test of the script

Writes ``benchmarks/results/lm_self_distillation-<part>.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import distillery as ds
from distillery.eval.lm import lm_metrics
from distillery.report.summary import fmt, mean_std, paired_difference

RESULTS = Path(__file__).resolve().parent / "results"

INJECTION = ("lm-prompt-distill", ["train.eval_every=0"])
QUICK_INJECTION = ["teacher.train.steps=20", "train.steps=10", "data.facts.entities=4", "data.facts.base_entities=4",
                   "data.facts.validation=4", "data.max_eval_blocks=10"]  # fmt: skip

AUSTEN = ("lm-teacher", ["train.eval_every=0"])
# the arithmetic fine-tuning of the Austen model: its tokenizer, a short warm-up that teaches it to read
# the answer in its prompt, then 1,000 steps per arm
FORGETTING = ["train.eval_every=0", "teacher.train.steps=300", "train.steps=1000", "data.seq_len=24"]
QUICK_AUSTEN = ["train.steps=10", "data.max_train_blocks=200", "data.max_eval_blocks=20"]
QUICK_FORGETTING = ["teacher.train.steps=6", "train.steps=6", "data.arithmetic.train=200",
                    "data.arithmetic.validation=10", "data.arithmetic.test=10", "data.max_eval_blocks=10"]  # fmt: skip


def metrics_of(run_dir: Path, seed: int, key: str) -> dict[str, float]:
    path = run_dir / f"seed-{seed}" / ("teacher.json" if key == "teacher" else f"{key}/result.json")
    return dict(json.loads(path.read_text())["metrics"])


# ---- knowledge injection ----------------------------------------------------------------------------


def run_injection(args, console: Console) -> dict[str, Any]:
    recipe, overrides = INJECTION
    overrides = [*overrides, f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}",
                 "name=lm-self-distillation-injection", *(QUICK_INJECTION if args.quick else [])]  # fmt: skip
    run_dir = ds.run(ds.load_config(recipe, overrides), console=console, progress=False).run_dir
    per_arm = {
        label: {s: metrics_of(run_dir, s, key) for s in args.seeds}
        for key, label in (
            ("teacher", "starting model"),
            ("baseline", "SFT"),
            ("distilled", "prompt distillation"),
        )
    }
    return {"recipe": recipe, "overrides": overrides, "per_seed": per_arm}


def injection_table(record: dict[str, Any]) -> str:
    per = record["per_seed"]
    rows = ["| model | closed-book test accuracy % | with the passage % |", "|---|---|---|"]
    for label, by_seed in per.items():
        acc = mean_std([m["task_accuracy"] for m in by_seed.values()])
        ctx = [m["context_accuracy"] for m in by_seed.values() if "context_accuracy" in m]
        rows.append(f"| {label} | {fmt(acc, 1)} | {fmt(mean_std(ctx), 1) if ctx else '-'} |")
    diff = paired_difference(
        {s: m["task_accuracy"] for s, m in per["prompt distillation"].items()},
        {s: m["task_accuracy"] for s, m in per["SFT"].items()},
    )
    rows.append("")
    rows.append(
        f"prompt distillation - SFT, closed-book accuracy: {fmt(diff, 1, signed=True)} points (paired over seeds)"
    )
    return "\n".join(rows)


# ---- forgetting -------------------------------------------------------------------------------------


def perplexity_on(model: torch.nn.Module, austen: dict[str, Any]) -> float:
    """Perplexity of ``model`` on the Austen test blocks (``austen``: the prepared data)."""
    return lm_metrics(model.eval(), austen["test"], 32, torch.device("cpu"), None, len(austen["tokenizer"]))[
        "perplexity"
    ]


def saved_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def run_forgetting(args, console: Console) -> dict[str, Any]:
    per_arm: dict[str, dict[int, dict]] = {
        k: {} for k in ("Austen model", "starting model", "SFT", "SDFT", "OPSD")
    }
    for seed in args.seeds:
        recipe, overrides = AUSTEN
        austen_over = [*overrides, f"seeds=[{seed}]", f"output.root={args.runs}", "name=lm-self-distillation-austen",
                       *(QUICK_AUSTEN if args.quick else [])]  # fmt: skip
        austen_run = ds.run(ds.load_config(recipe, austen_over), console=console, progress=False).run_dir
        austen_dir = austen_run / f"seed-{seed}" / "distilled" / "model"
        from distillery.tasks.lm import prepare_data

        austen = prepare_data(ds.load_config(
            "lm-kd", [f"data.tokenizer={{kind: pretrained, pretrained: '{austen_dir}'}}",
                      *(["data.max_eval_blocks=20"] if args.quick else [])],
        ))  # fmt: skip
        common = [*FORGETTING, f"seeds=[{seed}]", f"output.root={args.runs}",
                  f"student={{pretrained: '{austen_dir}'}}",
                  f"data.tokenizer={{kind: pretrained, pretrained: '{austen_dir}'}}",
                  *(QUICK_FORGETTING if args.quick else [])]  # fmt: skip
        opsd = ds.run(
            ds.load_config("lm-opsd", [*common, "name=lm-self-distillation-opsd"]),
            console=console,
            progress=False,
        ).run_dir
        sdft = ds.run(
            ds.load_config("lm-sdft", [*common, "name=lm-self-distillation-sdft", "baseline.enabled=false"]),
            console=console,
            progress=False,
        ).run_dir
        per_arm["Austen model"][seed] = {"austen_perplexity": perplexity_on(saved_model(austen_dir), austen)}
        start = metrics_of(opsd, seed, "teacher")
        per_arm["starting model"][seed] = {
            **start,
            "austen_perplexity": perplexity_on(starting_model(opsd, seed), austen),
        }
        for label, run_dir, key in (
            ("SFT", opsd, "baseline"),
            ("OPSD", opsd, "distilled"),
            ("SDFT", sdft, "distilled"),
        ):
            m = metrics_of(run_dir, seed, key)
            m["austen_perplexity"] = perplexity_on(
                saved_model(run_dir / f"seed-{seed}" / key / "model"), austen
            )
            per_arm[label][seed] = m
    return {"overrides": FORGETTING, "per_seed": per_arm}


def starting_model(run_dir: Path, seed: int) -> torch.nn.Module:
    """The starting model of a self-context run: its cached teacher entry, loaded into the pretrained student."""
    from distillery.teachers import TeacherStore

    info = json.loads((run_dir / f"seed-{seed}" / "teacher.json").read_text())
    cfg = ds.load_config(run_dir / "config.yaml")
    model = saved_model(Path(cfg.student.pretrained))
    TeacherStore(cfg.teacher.cache_dir).load(info["cache_key"], model)
    return model


def forgetting_table(record: dict[str, Any]) -> str:
    per = record["per_seed"]
    rows = [
        "| model | arithmetic exact match % | Austen perplexity | vs the Austen model |",
        "|---|---|---|---|",
    ]
    base = {s: m["austen_perplexity"] for s, m in per["Austen model"].items()}
    for label, by_seed in per.items():
        acc = [m["task_accuracy"] for m in by_seed.values() if "task_accuracy" in m]
        ppl = mean_std([m["austen_perplexity"] for m in by_seed.values()])
        rel = mean_std([100.0 * (m["austen_perplexity"] / base[s] - 1.0) for s, m in by_seed.items()])
        acc_s = fmt(mean_std(acc), 1) if acc else "-"
        rows.append(f"| {label} | {acc_s} | {fmt(ppl, 2)} | {fmt(rel, 1)}% |")
    return "\n".join(rows)


# ---- cross-tokenizer ----------------------------------------------------------------------------------

# a byte-level teacher -> the BPE student of lm-kd; the upper reference: lm-kd's own BPE teacher (the same
# architecture and steps) with token-level forward KL. Every arm: 0.5 CE + 0.5 of its divergence.
CROSS = ["train.eval_every=0", "teacher.train.steps=800", "train.steps=600", "data.seq_len=48"]
QUICK_CROSS = ["teacher.train.steps=4", "train.steps=4", "data.max_train_blocks=48", "data.max_eval_blocks=8",
               "data.seq_len=32", "data.tokenizer.vocab_size=300"]  # fmt: skip
CROSS_ARMS = {
    "ULD (byte teacher)": ("lm-cross-tokenizer", {"ce": {"weight": 0.5}, "uld": {"weight": 0.5}}),
    "span likelihood (byte teacher)": (
        "lm-cross-tokenizer", {"ce": {"weight": 0.5}, "span_likelihood": {"weight": 0.5}},
    ),
    "same-tokenizer KD (BPE teacher)": ("lm-kd", {"ce": {"weight": 0.5}, "forward_kl": {"weight": 0.5}}),
}  # fmt: skip


def run_cross(args, console: Console) -> dict[str, Any]:
    common = [
        *CROSS,
        f"seeds={json.dumps(args.seeds)}",
        f"output.root={args.runs}",
        *(QUICK_CROSS if args.quick else []),
    ]
    per_arm: dict[str, dict[int, dict]] = {}
    for i, (label, (recipe, loss)) in enumerate(CROSS_ARMS.items()):
        overrides = [*common, f"loss={json.dumps(loss)}", f"name=lm-self-distillation-cross-{i}",
                     f"baseline.enabled={'true' if i == 0 else 'false'}"]  # fmt: skip
        run_dir = ds.run(ds.load_config(recipe, overrides), console=console, progress=False).run_dir
        if i == 0:
            per_arm["SFT"] = {s: metrics_of(run_dir, s, "baseline") for s in args.seeds}
        per_arm[f"teacher of {label}"] = {s: metrics_of(run_dir, s, "teacher") for s in args.seeds}
        per_arm[label] = {s: metrics_of(run_dir, s, "distilled") for s in args.seeds}
    return {"overrides": common, "arms": CROSS_ARMS, "per_seed": per_arm}


def cross_table(record: dict[str, Any]) -> str:
    per = record["per_seed"]
    rows = ["| student | test perplexity (BPE tokens) | vs SFT (paired) | its teacher's perplexity (own tokens) |",
            "|---|---|---|---|"]  # fmt: skip
    sft = {s: m["perplexity"] for s, m in per["SFT"].items()}
    for label, by_seed in per.items():
        if label.startswith("teacher of"):
            continue
        ppl = mean_std([m["perplexity"] for m in by_seed.values()])
        diff = (
            "-"
            if label == "SFT"
            else fmt(paired_difference({s: m["perplexity"] for s, m in by_seed.items()}, sft), 2, signed=True)
        )
        teacher = per.get(f"teacher of {label}")
        t = fmt(mean_std([m["perplexity"] for m in teacher.values()]), 2) if teacher else "-"
        rows.append(f"| {label} | {fmt(ppl, 2)} | {diff} | {t} |")
    return "\n".join(rows)


# ---- several teachers -----------------------------------------------------------------------------------

# task -> (recipe, headline metric): three members of different quality (the first the strongest by
# design, chosen before any run) -> one student; every arm from the same cached members
TEACHER_TASKS = {
    "digits": ("digits-multi-teacher", "accuracy"),
    "fashion-mnist": ("fashion-mnist-multi-teacher", "accuracy"),
    "arithmetic": ("lm-multi-teacher", "task_accuracy"),
}
TEACHER_RULES = ("mean", "confidence", "agreement")
QUICK_TEACHERS = {
    "digits": [],
    "fashion-mnist": ["train.steps=10", "data.train=200", "data.validation=50", "data.test=100"],
    "arithmetic": ["train.steps=6", "data.arithmetic.train=120", "data.arithmetic.validation=10",
                   "data.arithmetic.test=10"],
}  # fmt: skip


def run_teachers(args, console: Console) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in args.teacher_tasks:
        recipe, metric = TEACHER_TASKS[task]
        common = [f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}", "train.eval_every=0",
                  *(QUICK_TEACHERS[task] if args.quick else [])]  # fmt: skip
        cfg = ds.load_config(recipe, common)
        strongest = cfg.teacher.members[0]
        single = strongest.model_dump(mode="json", exclude={"name", "precompute"}, exclude_none=True)
        arms = {f"single teacher ({strongest.name})": [f"teacher={json.dumps(single)}"]}
        arms.update({f"{rule} of 3": [f"teacher.combine={rule}"] for rule in TEACHER_RULES})
        per_arm: dict[str, dict[int, dict]] = {}
        for i, (label, extra) in enumerate(arms.items()):
            overrides = [
                *common,
                *extra,
                f"name=teachers-{task}-{i}",
                f"baseline.enabled={'true' if i == 0 else 'false'}",
            ]
            run_dir = ds.run(ds.load_config(recipe, overrides), console=console, progress=False).run_dir
            if i == 0:
                per_arm["student alone (CE)"] = {s: metrics_of(run_dir, s, "baseline") for s in args.seeds}
            if i == 1:  # the members, once
                for seed in args.seeds:
                    info = json.loads((run_dir / f"seed-{seed}" / "teacher.json").read_text())
                    for m in info["members"]:
                        per_arm.setdefault(f"teacher {m['name']}", {})[seed] = m["metrics"]
            per_arm[label] = {}
            for seed in args.seeds:
                record = json.loads((run_dir / f"seed-{seed}" / "distilled" / "result.json").read_text())
                per_arm[label][seed] = {**record["metrics"], **{
                    k: v for k, v in record.get("multi_teacher", {}).items() if k == "kept_fraction"}}  # fmt: skip
        out[task] = {"recipe": recipe, "metric": metric, "per_seed": per_arm}
    return {"tasks": out}


def teachers_table(record: dict[str, Any]) -> str:
    rows = []
    for task, part in record["tasks"].items():
        metric, per = part["metric"], part["per_seed"]
        base = {s: m[metric] for s, m in per["student alone (CE)"].items()}
        rows += [f"{task} (`{part['recipe']}`), {metric}:", "",
                 "| model | test % | vs the student alone (paired) | rows kept |", "|---|---|---|---|"]  # fmt: skip
        for label, by_seed in per.items():
            value = mean_std([m[metric] for m in by_seed.values()])
            student = not label.startswith("teacher ") and label != "student alone (CE)"
            diff = (
                fmt(paired_difference({s: m[metric] for s, m in by_seed.items()}, base), 2, signed=True)
                if student
                else "-"
            )
            kept = [m["kept_fraction"] for m in by_seed.values() if "kept_fraction" in m]
            rows.append(
                f"| {label} | {fmt(value, 2)} | {diff} | {fmt(mean_std([100 * k for k in kept]), 0) + '%' if kept else '-'} |"
            )
        rows.append("")
    return "\n".join(rows)


# ---- main -------------------------------------------------------------------------------------------


def _drop_run_folders(record: Any) -> None:
    """Remove ``output.root=...`` overrides (a local folder) from every list in ``record``, in place."""
    if isinstance(record, dict):
        for value in record.values():
            _drop_run_folders(value)
    elif isinstance(record, list):
        record[:] = [v for v in record if not (isinstance(v, str) and v.startswith("output.root="))]
        for value in record:
            _drop_run_folders(value)


PARTS = {
    "injection": (run_injection, injection_table),
    "cross_tokenizer": (run_cross, cross_table),
    "forgetting": (run_forgetting, forgetting_table),
    "teachers": (run_teachers, teachers_table),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", *PARTS], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts: checks the script, not the methods"
    )
    p.add_argument(
        "--teacher-tasks",
        nargs="+",
        choices=list(TEACHER_TASKS),
        default=list(TEACHER_TASKS),
        help="teachers: the tasks (digits runs in minutes; fashion-mnist and arithmetic take longer)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    for part in PARTS if args.part == "all" else [args.part]:
        run, table = PARTS[part]
        t0 = time.perf_counter()
        record = {"benchmark": "lm_self_distillation", "part": part, "seeds": args.seeds, "quick": args.quick,
                  **run(args, console)}  # fmt: skip
        record["seconds"] = time.perf_counter() - t0
        _drop_run_folders(record)  # where this machine kept its runs is not part of the result
        text = table(record)
        suffix = (
            "-" + "-".join(args.teacher_tasks)
            if part == "teachers" and args.teacher_tasks != list(TEACHER_TASKS)
            else ""
        )
        stem = f"lm_self_distillation-{part}{suffix}" + ("-quick" if args.quick else "")
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        (args.out / f"{stem}.md").write_text(text + "\n")
        console.print(text)
        console.print(f"{part}: {record['seconds']:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
