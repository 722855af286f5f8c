"""Representation signals on one CNN teacher and one smaller CNN student, paired over seeds.

Protocol (as `logit_family.py`): one teacher per seed (the `fashion-mnist-kd` teacher, trained on the
labelled split, cached), one student architecture (a CNN with 8 and 16 channels, ~9k parameters) from
the same initial weights in every arm, the same number of steps; the CE student trains on the
labelled split, every other arm on the labelled split plus the unlabelled transfer set (cross-entropy
on labelled rows only, the signal on every row). Arms: CE; KD (0.5 CE + 0.5 forward KL, T 2); CE +
FitNets hint, attention transfer, RKD (distance + angle), similarity-preserving, linear CKA; and KD +
each signal. The signals' layers and weights are those of the shipped recipes
(`fashion-mnist-fitnet`, `-at`, `-rkd`) and of the papers (see SIGNALS). Differences are paired to the
CE student per seed; `better` counts seeds where the arm is strictly better.

    python benchmarks/feature_family.py                    # Fashion-MNIST if installed, else digits
    python benchmarks/feature_family.py --steps 600 --seeds 0 1 2 3 4
    python benchmarks/feature_family.py --quick            # a smoke test of the script (a minute)
    python benchmarks/feature_family.py --resume           # run only the arms the saved JSON lacks

Writes ``benchmarks/results/feature_family-<dataset>.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

import distillery as ds
from distillery.data.fashion_mnist import find_files
from distillery.report.summary import fmt, mean_std, paired_difference, saved_record

RESULTS = Path(__file__).resolve().parent / "results"
BASE_RECIPE = {"fashion_mnist": "fashion-mnist-kd", "digits": "digits-kd"}
STUDENT = {
    "fashion_mnist": {"name": "cnn", "channels": [8, 16], "pool_every": 1, "pool_to": 7, "dropout": 0.1},
    "digits": {"name": "cnn", "channels": [8, 16], "pool_every": 1, "pool_to": 4, "dropout": 0.1},
}
# teacher overrides on digits: one CNN of the same layout as Fashion-MNIST's (the digits-kd teacher
# is an ensemble of two, and representation terms read one network)
TEACHER = {
    "fashion_mnist": [],
    "digits": [
        "teacher.ensemble=1",
        'teacher.model={"name": "cnn", "channels": [32, 64], "pool_every": 1, "pool_to": 4, "dropout": 0.3}',
    ],
}
METRICS = ("accuracy", "ece", "nll", "agreement")
KD = {"ce": {"weight": 0.5}, "forward_kl": {"weight": 0.5, "temperature": 2.0}}
# signal -> loss terms. Layers of both CNNs: body.1 = first conv block (ReLU), body.4 = second conv
# block (ReLU, before pooling), body.6 = the flattened penultimate features. Weights: FitNets 100
# (RepDistiller's beta for its MSE hint), AT 1000 / 2 (the paper's beta = 1000, halved as in its code),
# RKD 25 + 50 (the paper's), SP 3000 (the paper's gamma for CIFAR), CKA 10 (ours: 1 - CKA is in [0, 1]).
SIGNALS = {
    "FitNets": {"features": {"weight": 100.0, "student": "body.4", "teacher": "body.4", "projector": "conv1x1"}},
    "AT": {"attention_transfer": {"weight": 500.0, "student": ["body.1", "body.4"], "teacher": ["body.1", "body.4"]}},
    "RKD": {
        "rkd_distance": {"weight": 25.0, "student": "body.6", "teacher": "body.6"},
        "rkd_angle": {"weight": 50.0, "student": "body.6", "teacher": "body.6"},
    },
    "SP": {"sp": {"weight": 3000.0, "student": "body.4", "teacher": "body.4"}},
    "CKA": {"cka": {"weight": 10.0, "student": "body.6", "teacher": "body.6"}},
}  # fmt: skip


def arms() -> dict[str, dict]:
    out: dict[str, dict] = {"KD": KD}
    for name, terms in SIGNALS.items():
        out[f"CE + {name}"] = {"ce": {"weight": 1.0}, **terms}
    for name, terms in SIGNALS.items():
        out[f"KD + {name}"] = {**KD, **terms}
    return out


def pick_dataset(choice: str) -> str:
    if choice != "auto":
        return choice
    return "fashion_mnist" if find_files() is not None else "digits"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["auto", "fashion_mnist", "digits"], default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=600, help="training steps of every student arm")
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts: checks the script, not the methods"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown results")
    p.add_argument(
        "--runs", type=Path, default=Path("runs") / "benchmarks", help="root of the run directories"
    )
    p.add_argument(
        "--from-runs",
        action="store_true",
        help="build the table from the finished runs under --runs (an interrupted benchmark's completed arms)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the arms already in the saved JSON (same dataset, seeds, steps, student) and run the others",
    )
    args = p.parse_args(argv)

    console = Console()
    dataset = pick_dataset(args.dataset)
    base = BASE_RECIPE[dataset]
    steps = 20 if args.quick else args.steps
    common = [
        f"seeds={json.dumps(args.seeds)}",
        f"output.root={args.runs}",
        f"student={json.dumps(STUDENT[dataset])}",
        f"train.steps={steps}",
        "train.eval_every=0",
        *TEACHER[dataset],
    ]
    if args.quick:
        common += ["teacher.train.steps=30"]
    console.print(
        f"[bold]feature family[/bold] on {dataset} ({base}), seeds {args.seeds}, {steps} steps per arm"
    )

    t0 = time.perf_counter()
    if args.from_runs:
        per_arm, seconds, teacher = collect(args.runs / f"feature-family-{dataset}", base, common)
    else:
        per_arm, seconds, teacher, earlier = {}, {}, {}, 0.0
        if args.resume:
            per_arm, seconds, teacher, earlier = resume(args, dataset, steps)
            todo = [a for a in arms() if a not in per_arm]
            console.print(f"resuming: {len(per_arm)} arms kept; to run: {todo or 'none'}")
        for arm, loss in arms().items():
            if arm in per_arm:
                continue
            overrides = [*common, f"name=feature-family-{dataset}", f"loss={json.dumps(loss)}"]
            overrides.append(f"baseline.enabled={'false' if 'CE' in per_arm else 'true'}")
            cfg = ds.load_config(base, overrides)
            console.rule(arm)
            result = ds.run(cfg, console=console, progress=False)
            if "CE" not in per_arm:
                per_arm["CE"] = {s: r["metrics"] for s, r in result.arms["baseline"].items()}
                seconds["CE"] = sum(r["seconds"] for r in result.arms["baseline"].values())
                teacher = {s: t["metrics"] for s, t in result.teachers.items()}
            per_arm[arm] = {s: r["metrics"] for s, r in result.arms["distilled"].items()}
            seconds[arm] = sum(r["seconds"] for r in result.arms["distilled"].values())
            write(args, argv, console, dataset, base, steps, per_arm, seconds, teacher,
                  earlier + time.perf_counter() - t0)  # fmt: skip
    total = earlier + time.perf_counter() - t0 if not args.from_runs else sum(seconds.values())
    write(args, argv, console, dataset, base, steps, per_arm, seconds, teacher, total)
    return 0


def write(args, argv, console, dataset, base, steps, per_arm, seconds, teacher, total) -> None:
    """The JSON and the table of the arms run so far (rewritten after every arm)."""
    per_arm = {a: per_arm[a] for a in ["CE", *arms()] if a in per_arm}
    missing = [arm for arm in arms() if arm not in per_arm]
    ce_acc = {s: m["accuracy"] for s, m in per_arm["CE"].items()}
    kd_acc = {s: m["accuracy"] for s, m in per_arm.get("KD", {}).items()}
    rows = {"teacher": {k: mean_std([m[k] for m in teacher.values()]) for k in ("accuracy", "ece", "nll")}}
    for arm, by_seed in per_arm.items():
        stats = {k: mean_std([m[k] for m in by_seed.values() if k in m]) for k in METRICS}
        if arm.startswith("KD + ") and "KD" not in per_arm:
            continue
        acc = {s: m["accuracy"] for s, m in by_seed.items()}
        if arm != "CE":
            stats["delta_vs_ce"] = paired_difference(acc, ce_acc)
        if arm.startswith("KD + "):
            stats["delta_vs_kd"] = paired_difference(acc, kd_acc)
        stats["train_seconds_per_seed"] = seconds[arm] / len(by_seed)
        rows[arm] = stats
    record = {
        "benchmark": "feature_family",
        "dataset": dataset,
        "base_recipe": base,
        "seeds": args.seeds,
        "steps": steps,
        "quick": args.quick,
        "student": STUDENT[dataset],
        "arms": arms(),
        "results": rows,
        "per_seed": {"teacher": teacher, **per_arm},
        "arms_not_run": missing,
        "seconds": total,
        "seconds_note": "sum of the arms' training times" if args.from_runs else "wall time of the script",
        "command": "python benchmarks/feature_family.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "earlier_commands": getattr(args, "earlier_commands", []),
    }
    table = markdown(rows, len(args.seeds))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"feature_family-{dataset}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(table + "\n")
    console.print(f"total {total:.0f}s; wrote {args.out / stem}.json and .md")


def resume(args, dataset: str, steps: int):
    """Per-arm metrics, training seconds, teacher metrics and wall time of the saved JSON, when it was run
    on the same dataset, seeds, steps and student (else an error naming the mismatch)."""
    now = {"dataset": dataset, "seeds": args.seeds, "steps": steps, "student": STUDENT[dataset]}
    saved = saved_record(args.out / f"feature_family-{dataset}{'-quick' if args.quick else ''}.json", now)
    if saved is None:
        return {}, {}, {}, 0.0
    per_seed = {k: {int(s): m for s, m in v.items()} for k, v in saved["per_seed"].items()}
    teacher = per_seed.pop("teacher")
    n = len(args.seeds)
    seconds = {a: saved["results"][a]["train_seconds_per_seed"] * n for a in per_seed}
    args.earlier_commands = [*saved.get("earlier_commands", []), saved["command"]]
    return per_seed, seconds, teacher, float(saved.get("seconds", 0.0))


def collect(folder: Path, base: str, common: list[str]):
    """Per-arm metrics of the finished runs in ``folder`` (``summary.json`` written), matched to the arms
    by their resolved ``loss`` section; the newest run of an arm counts."""
    import yaml

    wanted = {}
    for arm, loss in arms().items():
        cfg = ds.load_config(base, [*common, f"loss={json.dumps(loss)}"])
        wanted[arm] = cfg.model_dump(mode="json")["loss"]
    per_arm: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    teacher: dict[int, dict[str, float]] = {}
    for run in sorted(folder.iterdir()):
        if not (run / "summary.json").is_file():
            continue
        loss = yaml.safe_load((run / "config.yaml").read_text())["loss"]
        arm = next((a for a, w in wanted.items() if w == loss), None)
        if arm is None:
            continue
        seeds = sorted(run.glob("seed-*"))
        records = {int(d.name[5:]): json.loads((d / "distilled" / "result.json").read_text()) for d in seeds}
        per_arm[arm] = {s: r["metrics"] for s, r in records.items()}
        seconds[arm] = sum(r["seconds"] for r in records.values())
        if all((d / "baseline" / "result.json").is_file() for d in seeds):
            base_records = {
                int(d.name[5:]): json.loads((d / "baseline" / "result.json").read_text()) for d in seeds
            }
            per_arm["CE"] = {s: r["metrics"] for s, r in base_records.items()}
            seconds["CE"] = sum(r["seconds"] for r in base_records.values())
            teacher = {
                int(d.name[5:]): json.loads((d / "teacher.json").read_text())["metrics"] for d in seeds
            }
    order = ["CE", *arms()]
    return {a: per_arm[a] for a in order if a in per_arm}, seconds, teacher


def markdown(rows: dict, n_seeds: int) -> str:
    lines = [
        "| student trained with | accuracy % | Δ acc vs CE (paired) | better | Δ acc vs KD (paired) | better "
        "| ECE % | NLL | agreement % | train s / seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in rows.items():
        cells = []
        for key in ("delta_vs_ce", "delta_vs_kd"):
            d = s.get(key)
            strictly = None if d is None else sum(v > 0 for v in d["per_seed"].values())
            cells += ["-", "-"] if d is None else [fmt(d, signed=True), f"{strictly}/{n_seeds}"]
        agree = fmt(s["agreement"], 1) if "agreement" in s else "-"
        secs = f"{s['train_seconds_per_seed']:.0f}" if "train_seconds_per_seed" in s else "-"
        lines.append(
            f"| {arm} | {fmt(s['accuracy'])} | {' | '.join(cells)} | {fmt(s['ece'])} | {fmt(s['nll'], 3)} "
            f"| {agree} | {secs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
