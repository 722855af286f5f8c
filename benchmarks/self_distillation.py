"""Self-distillation methods side by side, with and without label noise, paired over seeds.

Every arm trains the same student (same data, initial weights, steps, optimiser) and differs only in
its teacher source and loss; each is compared with the plain cross-entropy student of the same
seed and noise level. The training labels carry 0%, 20% or 40% symmetric noise; test labels are
clean.

    python benchmarks/self_distillation.py                     # digits (default; ~20 minutes)
    python benchmarks/self_distillation.py --dataset fashion_mnist
    python benchmarks/self_distillation.py --quick             # a smoke test of the script
    python benchmarks/self_distillation.py --arms multi-exit "multi-exit + hints" --tag hints

Writes ``benchmarks/results/self_distillation-<dataset>.json`` (every number) and ``.md`` (tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

import distillery as ds
from distillery.report.summary import fmt, mean_std, paired_difference

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("accuracy", "ece", "nll")
CE_KL = {"ce": {"weight": 1.0}, "forward_kl": {"weight": 1.0, "temperature": 1.0}}

# arm -> (teacher section or None, loss section). Born-again arms expand into one row per generation.
ARMS: dict[str, tuple[dict | None, dict]] = {
    "label smoothing 0.1": (None, {"ce": {"label_smoothing": 0.1}}),
    "USKD": (None, {"uskd": {"alpha": 1.0, "beta": 0.1}}),
    "born-again xi=0.5": ({"source": "snapshot", "generations": 3, "ensemble_eval": False},
                          {"kd": {"alpha": 0.5, "temperature": 1.0}}),
    "born-again xi=1.5": ({"source": "snapshot", "generations": 3, "ensemble_eval": False},
                          {"kd": {"alpha": 1.5, "temperature": 1.0}}),
    "PS-KD": ({"source": "past_predictions", "alpha_T": 0.8}, {"forward_kl": {"temperature": 1.0}}),
    "multi-exit": ({"source": "exits", "exits": {"at": ["body.2"]}}, CE_KL),
    "multi-exit, no SD": ({"source": "exits", "exits": {"at": ["body.2"]}},
                          {"ce": {"weight": 1.0}, "forward_kl": {"weight": 0.0}}),
    "multi-exit + hints": ({"source": "exits", "exits": {"at": ["body.2"], "hint_at": "body.4"}},
                           {**CE_KL, "hint": {"weight": 1.0}}),
    "mutual learning (K=2)": ({"source": "peers", "peers": 2}, CE_KL),
    "mean teacher (EMA 0.99)": ({"source": "ema", "momentum": 0.99}, CE_KL),
    "random teacher": ({"source": "random"}, CE_KL),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["digits", "fashion_mnist"], default="digits")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts: checks the script, not the methods"
    )
    p.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        metavar="ARM",
        help=f"run only these arms (the CE student always); one of: {'; '.join(ARMS)}",
    )
    p.add_argument("--tag", help="suffix of the result files (default with --arms: 'subset')")
    p.add_argument(
        "--tables-from",
        type=Path,
        metavar="JSON",
        help="do not train: rewrite the Markdown tables (full and compact) of an earlier run's JSON",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)

    console = Console()
    if args.tables_from is not None:
        record = json.loads(args.tables_from.read_text())
        write_tables(record["results"], len(record["seeds"]), args.tables_from.with_suffix(""))
        console.print(f"wrote {args.tables_from.with_suffix('.md')} and -compact.md")
        return 0
    common = [f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}", "train.eval_every=0"]
    if args.dataset == "fashion_mnist":
        common += ["data.name=fashion_mnist", "data.labelled=10000", "data.test=null", "train.steps=5000"]
    if args.quick:
        common += ["train.steps=30"]
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for rate in args.noise:
        noise = [f"data.label_noise={json.dumps({'rate': rate, 'kind': 'symmetric'})}"] if rate else []
        per_arm: dict[str, dict[int, dict]] = {}
        members: dict[str, dict[int, dict]] = {}
        chosen = {k: v for k, v in ARMS.items() if args.arms is None or k in args.arms}
        for i, (arm, (teacher, loss)) in enumerate(chosen.items()):
            console.rule(f"noise {rate:.0%}: {arm}")
            overrides = [*common, *noise, f"name=self-distillation-{args.dataset}", f"loss={json.dumps(loss)}",
                         f"teacher={json.dumps(teacher)}", f"baseline.enabled={'true' if i == 0 else 'false'}"]  # fmt: skip
            if teacher and teacher["source"] == "snapshot":
                overrides[-1] = "baseline.enabled=true"  # generation 0 is the CE student
            result = ds.run(ds.load_config("digits-self", overrides), console=console, progress=False)
            if i == 0:
                per_arm["CE"] = {s: r["metrics"] for s, r in result.arms["baseline"].items()}
            for name, by_seed in result.arms.items():
                if name == "baseline":
                    continue
                row = arm if name == "distilled" else f"{arm}, generation {name.removeprefix('gen-')}"
                per_arm[row] = {s: r["metrics"] for s, r in by_seed.items()}
                if any("members" in r for r in by_seed.values()):
                    members[arm] = {s: r["members"] for s, r in by_seed.items()}
        results[f"{rate:.0%}"] = {"per_seed": per_arm, "members": members, "summary": summarize(per_arm)}
    seconds = time.perf_counter() - t0

    text = markdown(results, len(args.seeds))
    print(text)
    print(compact(results, len(args.seeds)))
    record = {
        "benchmark": "self_distillation",
        "dataset": args.dataset,
        "seeds": args.seeds,
        "noise": args.noise,
        "quick": args.quick,
        "arms": {
            k: {"teacher": t, "loss": lo}
            for k, (t, lo) in ARMS.items()
            if args.arms is None or k in args.arms
        },
        "results": results,
        "seconds": seconds,
        "command": "python benchmarks/self_distillation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("subset" if args.arms else None)
    stem = f"self_distillation-{args.dataset}" + (f"-{tag}" if tag else "") + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    write_tables(results, len(args.seeds), args.out / stem)
    console.print(f"total {seconds:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


def write_tables(results: dict[str, dict], n_seeds: int, stem: Path) -> None:
    """``<stem>.md`` (every metric per noise level) and ``<stem>-compact.md`` (paired deltas only)."""
    stem.with_suffix(".md").write_text(markdown(results, n_seeds) + "\n")
    Path(f"{stem}-compact.md").write_text(compact(results, n_seeds) + "\n")


def compact(results: dict[str, dict], n_seeds: int) -> str:
    """One row per method: paired Δ accuracy (wins) and Δ ECE against CE at every noise level."""
    noises = list(results)
    head = " | ".join(f"Δ acc {n} (wins) | Δ ECE {n}" for n in noises)
    lines = [
        f"Paired differences to the CE student (points; mean over {n_seeds} seeds, wins = seeds better "
        f"than CE; CE accuracy / ECE: "
        + ", ".join(
            f"{n}: {fmt(results[n]['summary']['CE']['accuracy'])} / {fmt(results[n]['summary']['CE']['ece'])}"
            for n in noises
        )
        + ").",
        "",
        f"| method | {head} |",
        "|---|" + "---|" * (2 * len(noises)),
    ]
    arms = [a for a in results[noises[0]]["summary"] if a != "CE"]
    for arm in arms:
        cells = []
        for n in noises:
            s = results[n]["summary"].get(arm)
            if s is None:
                cells += ["-", "-"]
                continue
            d_acc, d_ece = s["delta_accuracy"], s["delta_ece"]
            cells += [f"{d_acc['mean']:+.2f} ({d_acc['wins']}/{n_seeds})", f"{d_ece['mean']:+.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(per_arm: dict[str, dict[int, dict]]) -> dict[str, dict]:
    ce = per_arm["CE"]
    out = {}
    for arm, by_seed in per_arm.items():
        stats = {m: mean_std([r[m] for r in by_seed.values()]) for m in METRICS}
        if arm != "CE":
            for m in METRICS:
                stats[f"delta_{m}"] = paired_difference(
                    {s: r[m] for s, r in by_seed.items()}, {s: r[m] for s, r in ce.items()}
                )
        out[arm] = stats
    return out


def markdown(results: dict[str, dict], n_seeds: int) -> str:
    lines = []
    for noise, block in results.items():
        lines += [
            f"**Label noise {noise}** (symmetric; clean test labels), mean ± std over {n_seeds} seeds; "
            "Δ = paired difference to the CE student of the same seed.",
            "",
            "| method | accuracy % | Δ accuracy | wins | ECE % | Δ ECE | NLL |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, s in block["summary"].items():
            d_acc, d_ece = s.get("delta_accuracy"), s.get("delta_ece")
            lines.append(
                f"| {arm} | {fmt(s['accuracy'])} | {fmt(d_acc, signed=True) if d_acc else '-'} | "
                f"{str(d_acc['wins']) + '/' + str(n_seeds) if d_acc else '-'} | {fmt(s['ece'])} | "
                f"{fmt(d_ece, signed=True) if d_ece else '-'} | {fmt(s['nll'], 3)} |"
            )
        for arm, by_seed in block["members"].items():
            names = list(next(iter(by_seed.values())))
            cells = []
            for name in names:
                acc = mean_std([r[name]["accuracy"] for r in by_seed.values()])
                cells.append(f"{name} {fmt(acc)}")
            lines.append(f"| ↳ {arm}: every output | " + "; ".join(cells) + " | | | | | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
