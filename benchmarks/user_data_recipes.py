"""The two recipes that read the user's own files, run as shipped from an empty teacher cache.

* ``text-classification-kd``: WordNet definitions in CSV files (examples/text-classification), an
  ensemble of 3 bag-of-embeddings teachers -> a 16k-parameter student, CE vs KD, 3 paired seeds;
* ``lm-prompt-completion-kd``: prompt/completion pairs in JSONL (examples/lm, spell a number digit by
  digit), a 2-layer Llama teacher -> a 1-layer student, SFT vs token-level KD, 1 seed.

Each recipe runs once with its own settings and a fresh, empty teacher cache (so its teachers are
trained, and timed, inside the run); the numbers are the runs' test splits, evaluated once after
training. Run it from the repository root (the recipes' data paths are relative to it):

    python benchmarks/user_data_recipes.py
    python benchmarks/user_data_recipes.py --recipe text-classification-kd

Writes ``benchmarks/results/user_data_recipes.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

import distillery as ds
from distillery.report.summary import fmt

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("text-classification-kd", "lm-prompt-completion-kd")


# recipe -> the metrics reported (test split), the first one the recipe's measure of success
METRICS = {
    "text-classification-kd": ("accuracy", "nll"),
    "lm-prompt-completion-kd": ("task_accuracy", "perplexity"),
}
LOWER_IS_BETTER = {"nll", "perplexity", "ece"}


def run_recipe(name: str, runs: Path, console: Console) -> dict:
    with tempfile.TemporaryDirectory(prefix="distillery-empty-cache-") as cache:
        os.environ["DISTILLERY_CACHE"] = cache  # an empty teacher cache: every teacher is trained here
        cfg = ds.load_config(name, [f"output.root={runs}"])
        t0 = time.perf_counter()
        result = ds.run(cfg, console=console, progress=False)
        seconds = time.perf_counter() - t0
    summary = result.summary
    models = summary["models"]
    metrics = {}
    for key in METRICS[name]:
        metrics[key] = {
            "teacher": models["teacher"][key],
            "baseline": models["baseline"][key],
            "distilled": models["distilled"][key],
            "paired": summary["paired_distilled_minus_baseline"][key],
        }
    return {
        "recipe": name,
        "task": summary["task"],
        "seeds": summary["seeds"],
        "labels": {k: models[k]["label"] for k in ("teacher", "baseline", "distilled")},
        "params": {k: models[k]["params"] for k in ("teacher", "baseline", "distilled")},
        "metrics": metrics,
        "run_dir": f"{result.run_dir.parent.name}/{result.run_dir.name}",  # under --runs
        "seconds": seconds,
    }


def markdown(records: list[dict]) -> str:
    lines = [
        "| recipe | seeds | test metric | teacher | baseline | distilled | distilled - baseline (paired) "
        "| distilled better | time, empty cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for key, m in r["metrics"].items():
            paired = m["paired"]
            unit = "" if key in LOWER_IS_BETTER else " %"
            lines.append(
                f"| `{r['recipe']}` | {len(r['seeds'])} | {key.replace('_', ' ')}{unit} | {fmt(m['teacher'], 2)} "
                f"| {r['labels']['baseline']}: {fmt(m['baseline'], 2)} | {r['labels']['distilled']}: "
                f"{fmt(m['distilled'], 2)} | {fmt(paired, 2, signed=True)} | {paired['better']}/{paired['n']} "
                f"| {r['seconds']:.0f} s |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=[*RECIPES, "both"], default="both")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmarks"), help="where the run folders go")
    p.add_argument("--out", type=Path, default=RESULTS / "user_data_recipes.json")
    args = p.parse_args(argv)
    if not Path("examples/text-classification/train.csv").is_file():
        print("error: run this from the repository root (the recipes read examples/...)", file=sys.stderr)
        return 2
    console = Console()
    names = RECIPES if args.recipe == "both" else (args.recipe,)
    records = [run_recipe(name, args.runs, console) for name in names]
    table = markdown(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipes": records, "torch": __import__("torch").__version__}, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
