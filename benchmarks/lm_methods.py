"""Language-model distillation methods side by side on tiny causal LMs, paired over seeds.

One teacher per seed (trained first, cached), one student architecture from the same initial weights,
the same number of steps for every arm:

* arithmetic (the built-in verifiable task): SFT, token-level forward KL, reverse KL, JSD(0.5),
  sequence-level KD, on-policy GKD (lambda 0.5, JSD 0.5) and speculative KD;
* austen (the built-in corpus, packed text): SFT and the token-level divergences (sampling methods need
  prompts).

Reported: held-out perplexity, next-token agreement with the teacher, the teacher-scored NLL of the
student's own samples (answers to the test problems; on austen, 32-token continuations of the first 16
tokens of 64 test passages), and exact-match accuracy of greedy answers (arithmetic); mean ± std and
paired differences to SFT.

    python benchmarks/lm_methods.py                   # both tasks, 3 seeds
    python benchmarks/lm_methods.py --task arithmetic
    python benchmarks/lm_methods.py --quick           # a smoke test of the script
    python benchmarks/lm_methods.py --tables-from benchmarks/results/lm_methods-austen.json  # table only

Writes ``benchmarks/results/lm_methods-<task>.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import distillery as ds
from distillery.data.text import load_tokenizer
from distillery.eval.lm import teacher_scored_nll
from distillery.models.causal_lm import build_causal_lm
from distillery.report.summary import fmt, mean_std, paired_difference
from distillery.teachers import TeacherStore

RESULTS = Path(__file__).resolve().parent / "results"

# task -> (base recipe, overrides): the recipes' data, teacher and student; every arm trains the same
# steps, and evaluation during training is off (the reported numbers are the test split's).
TASKS = {
    "arithmetic": ("lm-arithmetic", ["train.eval_every=0"]),
    "austen": ("lm-kd", ["teacher.train.steps=1500", "train.steps=800", "train.eval_every=0"]),
}

TOKEN_ARMS = {
    "forward KL": ({"forward_kl": {}}, {}),
    "reverse KL": ({"reverse_kl": {}}, {}),
    "JSD(0.5)": ({"jsd": {"beta": 0.5}}, {}),
}
SAMPLING_ARMS = {
    "sequence-level KD": ({"ce": {}}, {"name": "sequence", "max_new_tokens": 6}),
    "GKD (lambda 0.5, JSD 0.5)": (
        {"jsd": {"beta": 0.5}},
        {"name": "on_policy", "student_lambda": 0.5, "max_new_tokens": 6},
    ),
    "speculative KD (top-3, forward KL)": (
        {"forward_kl": {}},
        {"name": "speculative", "student_lambda": 1.0, "top_k": 3, "max_new_tokens": 6},
    ),
}


def arms_for(task: str) -> dict[str, tuple[dict, dict]]:
    return {**TOKEN_ARMS, **(SAMPLING_ARMS if task == "arithmetic" else {})}


def load_teacher(run_dir: Path, seed: int, cfg, tokenizer):
    info = json.loads((run_dir / f"seed-{seed}" / "teacher.json").read_text())
    model = build_causal_lm(cfg.teacher.model, len(tokenizer), tokenizer)
    TeacherStore(cfg.teacher.cache_dir).load(info["cache_key"], model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["both", "arithmetic", "austen"], default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts: checks the script, not the methods"
    )
    p.add_argument(
        "--tables-from",
        type=Path,
        metavar="JSON",
        help="do not train: rewrite the Markdown table of an earlier run's JSON",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)
    console = Console()
    if args.tables_from is not None:
        record = json.loads(args.tables_from.read_text())
        table = markdown(record["task"], record["per_seed"], len(record["seeds"]))
        args.tables_from.with_suffix(".md").write_text(table + "\n")
        console.print(table)
        return 0
    tasks = ["arithmetic", "austen"] if args.task == "both" else [args.task]
    for task in tasks:
        run_task(task, args, console)
    return 0


def run_task(task: str, args, console: Console) -> None:
    common = [
        *TASKS[task][1],
        f"seeds={json.dumps(args.seeds)}",
        f"output.root={args.runs}",
        f"name=lm-methods-{task}",
    ]
    if args.quick:
        common += [
            "teacher.train.steps=20",
            "train.steps=10",
            "data.max_train_blocks=200",
            "data.max_eval_blocks=20",
        ]
        if task == "arithmetic":
            common += [
                "data.arithmetic.train=300",
                "data.arithmetic.validation=20",
                "data.arithmetic.test=20",
            ]
    t0 = time.perf_counter()
    per_arm: dict[str, dict[int, dict]] = {}
    for i, (arm, (loss, method)) in enumerate(arms_for(task).items()):
        console.rule(f"{task}: {arm}")
        overrides = [*common, f"loss={json.dumps(loss)}", f"method={json.dumps(method)}",
                     f"baseline.enabled={'true' if i == 0 else 'false'}"]  # fmt: skip
        cfg = ds.load_config(TASKS[task][0], overrides)
        run_dir = ds.run(cfg, console=console, progress=False).run_dir
        for key, label in (("teacher", "teacher"), ("baseline", "SFT"), ("distilled", arm)):
            if key == "teacher" and "teacher" in per_arm:
                continue
            if key == "baseline" and i != 0:
                continue
            per_arm[label] = {}
            for seed in args.seeds:
                path = (
                    run_dir / f"seed-{seed}" / ("teacher.json" if key == "teacher" else f"{key}/result.json")
                )
                per_arm[label][seed] = dict(json.loads(path.read_text())["metrics"])
        # the teacher's NLL of each student's own samples: answers to the test problems (arithmetic), or
        # continuations of the first PREFIX_TOKENS tokens of test passages (austen)
        new_tokens = 6 if task == "arithmetic" else CONTINUATION_TOKENS
        for seed in args.seeds:
            tokenizer = load_tokenizer(run_dir / f"seed-{seed}" / "distilled" / "model")
            teacher = load_teacher(run_dir, seed, cfg, tokenizer)
            prompts = sample_prompts(task, cfg, tokenizer)
            for key, label in (("baseline", "SFT"), ("distilled", arm)):
                if key == "baseline" and i != 0:
                    continue
                student = ds_load_student(run_dir / f"seed-{seed}" / key / "model")
                per_arm[label][seed]["teacher_nll"] = teacher_scored_nll(
                    student, teacher, tokenizer, prompts, max_new_tokens=new_tokens, seed=seed
                )
    seconds = time.perf_counter() - t0
    table = markdown(task, per_arm, len(args.seeds))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"lm_methods-{task}" + ("-quick" if args.quick else "")
    record = {
        "benchmark": "lm_methods",
        "task": task,
        "seeds": args.seeds,
        "quick": args.quick,
        "overrides": common,
        "arms": {k: {"loss": lo, "method": me} for k, (lo, me) in arms_for(task).items()},
        "per_seed": per_arm,
        "seconds": seconds,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    console.print(f"{task}: {seconds:.0f}s; wrote {args.out / stem}.json and .md")


PREFIX_TOKENS = 16  # austen: prompts are the first tokens of test passages
CONTINUATION_TOKENS = 32  # austen: sampled continuation length scored by the teacher
AUSTEN_PROMPTS = 64


def sample_prompts(task: str, cfg, tokenizer) -> list[str]:
    """Test prompts the students continue: the held-out problems, or the openings of test passages."""
    if task == "arithmetic":
        arith = cfg.data.arithmetic
        return [ex.prompt for ex in arith.build().split(arith.train, arith.test)[1]]
    from distillery.tasks.lm import prepare_data

    test = prepare_data(cfg)["test"]
    return [
        tokenizer.decode(test.input_ids[i][:PREFIX_TOKENS], skip_special_tokens=True)
        for i in range(min(AUSTEN_PROMPTS, len(test)))
    ]


def ds_load_student(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


METRICS = [("perplexity", "test perplexity", 2), ("agreement", "agreement with teacher %", 1),
           ("teacher_nll", "teacher NLL of own samples", 3),
           ("task_accuracy", "exact match %", 1)]  # fmt: skip


def markdown(task: str, per_arm: dict[str, dict[int, dict]], n_seeds: int) -> str:
    present = [m for m in METRICS if any(m[0] in r for by in per_arm.values() for r in by.values())]
    head = ["model"]
    for _, name, _ in present:
        head += [name, f"Δ {name.split(' ')[0]} vs SFT"]
    lines = [f"**{task}**, mean ± std over {n_seeds} seeds; Δ = paired difference to the SFT student.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    sft = per_arm.get("SFT", {})
    for arm, by_seed in per_arm.items():
        cells = [arm]
        for key, _, digits in present:
            values = [r[key] for r in by_seed.values() if key in r]
            cells.append(fmt(mean_std(values), digits) if values else "-")
            if arm in ("teacher", "SFT") or not values or not sft:
                cells.append("-")
                continue
            d = paired_difference(
                {s: r[key] for s, r in by_seed.items()}, {s: r[key] for s, r in sft.items()}
            )
            cells.append(fmt(d, digits, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
