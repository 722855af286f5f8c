"""Data-free distillation: DeepInversion + KD vs KD on real images vs cross-entropy on the labelled images.

Per dataset and seed, one teacher (a CNN with batch norm, trained on the labelled images and cached),
and the same small CNN student trained three ways for the same number of steps:

* **CE, labelled images**: cross-entropy on the real labelled training images (the ``digits-deepinversion``
  baseline arm);
* **DeepInversion + KD**: KD (forward KL, T = 4) on inputs synthesised from the teacher alone -- no real
  training image is seen (the recipe's distilled arm);
* **KD, real images**: the same KD term on the real labelled images (``data_free=null``), what a transfer
  set of real data buys.

    python benchmarks/data_free.py                        # digits and Fashion-MNIST, seeds 0 1 2
    python benchmarks/data_free.py --dataset digits
    python benchmarks/data_free.py --quick                # a smoke test of the script

Writes ``benchmarks/results/data_free.json`` (every number), ``.md`` (the table) and, per dataset, the
first seed's synthesised inputs as ``data_free-<dataset>-synthetic.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import distillery as ds
from distillery.report.summary import mean_std, paired_difference

RESULTS = Path(__file__).resolve().parent / "results"

DATASETS: dict[str, list[str]] = {
    "digits": [],  # the recipe as it is
    "fashion_mnist": [
        "data={name: fashion_mnist, validation: 6000, labelled: 54000, transfer: 0}",
        "teacher.model={name: cnn, channels: [32, 64], pool_every: 1, pool_to: 7, dropout: 0.3, batch_norm: true}",
        "teacher.train.steps=3000",
        "teacher.train.batch_size=128",
        "student={name: cnn, channels: [8, 16], pool_every: 1, pool_to: 7, dropout: 0.0}",
        "train.steps=3000",
        "train.batch_size=128",
        "baseline.train.steps=3000",
        "baseline.train.batch_size=128",
        "data_free.flip=true",  # clothes are about left-right symmetric; digits are not
    ],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["all", *DATASETS], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the script, not the method")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)

    console = Console()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for dataset in DATASETS if args.dataset == "all" else [args.dataset]:
        common = [f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}", "train.eval_every=0",
                  f"name=data-free-{dataset}", *DATASETS[dataset]]  # fmt: skip
        if args.quick:
            common += ["teacher.train.steps=20", "train.steps=20", "baseline.train.steps=20",
                       "data_free.images=64", "data_free.batch_size=32", "data_free.steps=5"]  # fmt: skip
        t = time.perf_counter()
        console.rule(f"{dataset}: DeepInversion + KD, and CE on the labelled images")
        inverted = ds.run(ds.load_config("digits-deepinversion", common), console=console, progress=False)
        console.rule(f"{dataset}: KD on the real labelled images")
        real = ds.run(
            ds.load_config("digits-deepinversion", [*common, "data_free=null", "baseline.enabled=false"]),
            console=console,
            progress=False,
        )
        arms = {
            "CE, labelled images": inverted.arms["baseline"],
            "DeepInversion + KD (no real image)": inverted.arms["distilled"],
            "KD, real images": real.arms["distilled"],
        }
        grid = inverted.run_dir / f"seed-{args.seeds[0]}" / "distilled" / "synthetic.png"
        if grid.is_file() and not args.quick:  # what the student learnt from, beside the numbers
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, args.out / f"data_free-{dataset}-synthetic.png")
        results[dataset] = {
            "teacher": {s: r["metrics"] for s, r in inverted.teachers.items()},
            "arms": {
                name: {
                    s: {
                        "metrics": r["metrics"],
                        "train_examples": r["train_examples"],
                        "data_free": r.get("data_free"),
                    }
                    for s, r in by.items()
                }
                for name, by in arms.items()
            },
            "seconds": time.perf_counter() - t,
        }
    seconds = time.perf_counter() - t0
    text = markdown(results, args)
    print(text)
    record = {
        "benchmark": "data_free",
        "seeds": args.seeds,
        "quick": args.quick,
        "datasets": {d: DATASETS[d] for d in results},
        "results": results,
        "seconds": seconds,
        "command": "python benchmarks/data_free.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "data_free" + ("" if args.dataset == "all" else f"-{args.dataset}") + ("-quick" if args.quick else "")
    )
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(text + "\n")
    console.print(f"total {seconds:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


def markdown(results: dict[str, Any], args) -> str:
    n = len(args.seeds)
    lines = [
        f"mean ± std over {n} seeds; Δ = paired difference to the CE student of the same seed (wins = seeds "
        "better); the DeepInversion row also gives the teacher's accuracy on its own synthesised inputs.",
        "",
        "| dataset | student | real training images seen | test accuracy % | Δ vs CE (wins) | teacher on synthesised % |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, block in results.items():
        teacher = mean_std([m["accuracy"] for m in block["teacher"].values()])
        lines.append(
            f"| {dataset} | teacher (CNN, batch norm) | all labelled | {teacher['mean']:.2f} ± {teacher['std']:.2f} | - | - |"
        )
        ce = {s: r["metrics"]["accuracy"] for s, r in block["arms"]["CE, labelled images"].items()}
        for name, by_seed in block["arms"].items():
            acc = {s: r["metrics"]["accuracy"] for s, r in by_seed.items()}
            stat = mean_std(list(acc.values()))
            first = next(iter(by_seed.values()))
            seen = "0" if first["data_free"] else f"{first['train_examples']:,}"
            delta = "-"
            if not name.startswith("CE"):
                d = paired_difference(acc, ce)
                delta = f"{d['mean']:+.2f} ({d['wins']}/{n})"
            synth = "-"
            if first["data_free"]:
                synth = (
                    f"{mean_std([r['data_free']['teacher_accuracy'] for r in by_seed.values()])['mean']:.1f}"
                )
            lines.append(
                f"| {dataset} | {name} | {seen} | {stat['mean']:.2f} ± {stat['std']:.2f} | {delta} | {synth} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
