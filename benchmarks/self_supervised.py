"""Self-supervised and semi-supervised self-distillation on Fashion-MNIST, every method under one budget.

Representations (the ``fashion-mnist-{dino,ibot,data2vec,byol,random-teacher}`` recipes): the same
small ViT (patch 4 on 16x16 crops, depth 4, width 64), the same views, steps and batch size for every
method, 54,000 unlabelled training images; judged on the official test split by a weighted k-NN
(k = 20, T = 0.07) and a logistic-regression probe on the frozen [CLS] embedding, with all 54,000
labels and with 600 (class-balanced, fixed per seed). References: the same probes on raw pixels
(28x28, flattened) and on the untrained ViT (the recipes' ``baseline`` arm).

Semi-supervised (``fashion-mnist-{mean-teacher,fixmatch,noisy-student}``): 600 labelled + 53,400
unlabelled images, the same small CNN, steps and batch size (64 labelled + 192 unlabelled rows per
step); test accuracy against "supervised only" (the same student, noise and steps on the 600 labels,
64 per step: the same labelled stream; the recipes' ``baseline`` arm, run once and checked equal).

    python benchmarks/self_supervised.py                    # 3 seeds, the recipes' budgets
    python benchmarks/self_supervised.py --quick            # a smoke test of the script (digits-sized)
    python benchmarks/self_supervised.py --resume           # keep the arms already saved, run the rest
    python benchmarks/self_supervised.py --ssl-steps 2000   # a longer schedule (e.g. on a GPU)
    python benchmarks/self_supervised.py --resume --rerun semi   # run the semi-supervised rows again

Needs the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``). Writes
``benchmarks/results/self_supervised.json`` (every number) and ``.md`` (the tables).
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
from distillery.eval.probes import knn_accuracy, linear_probe
from distillery.report.summary import fmt, mean_std, paired_difference, saved_record

RESULTS = Path(__file__).resolve().parent / "results"
SSL = {
    "DINO": "fashion-mnist-dino",
    "iBOT": "fashion-mnist-ibot",
    "data2vec": "fashion-mnist-data2vec",
    "BYOL": "fashion-mnist-byol",
    "random teacher": "fashion-mnist-random-teacher",
}
SEMI = {
    "mean teacher": "fashion-mnist-mean-teacher",
    "FixMatch": "fashion-mnist-fixmatch",
    "noisy student": "fashion-mnist-noisy-student",
}
SSL_METRICS = ("knn", "probe", "knn_few", "probe_few")
PIXELS, UNTRAINED, SUPERVISED = "raw pixels", "random init (untrained)", "supervised only"
SEMI_ROWS = [SUPERVISED, "mean teacher", "FixMatch", "noisy student gen 1", "noisy student gen 2"]
RAW_PIXEL_KNN = 85.5  # the reference figure for k-NN on Fashion-MNIST pixels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--ssl-steps", type=int, default=None, help="steps of every SSL arm (default: the recipes')"
    )
    p.add_argument("--semi-steps", type=int, default=None, help="steps of every semi-supervised arm")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks that the script runs")
    p.add_argument("--resume", action="store_true", help="keep the arms of the saved JSON and run the others")
    p.add_argument(
        "--rerun",
        choices=["ssl", "semi"],
        nargs="+",
        default=[],
        help="with --resume: drop these saved rows (the SSL or the semi-supervised ones) and run them again",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    args = p.parse_args(argv)
    console = Console()

    ssl_steps = 6 if args.quick else args.ssl_steps
    semi_steps = 6 if args.quick else args.semi_steps
    common = [f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}"]
    quick_data = (
        ['data={"name": "fashion_mnist", "validation": 500, "test": 500, "labelled": 3000}']
        if args.quick
        else []
    )
    budget = {"seeds": args.seeds, "ssl_steps": ssl_steps, "semi_steps": semi_steps, "quick": args.quick}
    stem = "self_supervised" + ("-quick" if args.quick else "")
    per_arm: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    earlier, history = 0.0, []
    if args.resume:
        saved = saved_record(args.out / f"{stem}.json", budget)
        if saved is not None:
            per_arm = {a: {int(s): m for s, m in v.items()} for a, v in saved["per_seed"].items()}
            seconds, earlier = saved["train_seconds"], float(saved["seconds"])
            history = [*saved.get("earlier_commands", []), saved["command"]]
        for rows in args.rerun:
            for arm in SSL if rows == "ssl" else SEMI_ROWS:
                per_arm.pop(arm, None)
                seconds.pop(arm, None)
        console.print(f"resuming: kept {', '.join(per_arm) or 'nothing'}")
    t0 = time.perf_counter()

    def save() -> None:
        write(
            args, argv, console, stem, budget, per_arm, seconds, earlier + time.perf_counter() - t0, history
        )

    if PIXELS not in per_arm:
        per_arm[PIXELS] = pixel_probes(SSL["DINO"], [*common, *quick_data], args.seeds)
        seconds[PIXELS] = 0.0
        save()
    for method, recipe in SSL.items():
        if method in per_arm:
            continue
        overrides = [*common, *quick_data, f"name=bench-{recipe}"]
        if ssl_steps is not None:
            overrides += [f"train.steps={ssl_steps}", f"train.eval_every={max(1, ssl_steps // 4)}"]
        if args.quick:
            overrides += ["eval.few_labels=60", "eval.validation_bank=500", "eval.probe_max_iter=50"]
        overrides.append(f"baseline.enabled={'false' if UNTRAINED in per_arm else 'true'}")
        console.rule(method)
        result = ds.run(ds.load_config(recipe, overrides), console=console, progress=False)
        if UNTRAINED not in per_arm:
            per_arm[UNTRAINED] = {s: r["metrics"] for s, r in result.arms["baseline"].items()}
            seconds[UNTRAINED] = 0.0
        per_arm[method] = {s: r["metrics"] for s, r in result.arms["distilled"].items()}
        seconds[method] = sum(r["seconds"] for r in result.arms["distilled"].values())
        save()
    for method, recipe in SEMI.items():
        arms = ["noisy student gen 1", "noisy student gen 2"] if method == "noisy student" else [method]
        if all(a in per_arm for a in arms):
            continue
        overrides = [*common, f"name=bench-{recipe}"]
        if semi_steps is not None:
            overrides += [f"train.steps={semi_steps}", f"train.eval_every={max(1, semi_steps // 4)}"]
        if args.quick:
            overrides += [
                'data={"name": "fashion_mnist", "validation": 500, "test": 500, "labelled": 100, "transfer": 2000}'
            ]
        if SUPERVISED in per_arm and method != "noisy student":  # its generation 0 is the baseline
            overrides.append("baseline.enabled=false")  # one supervised-only run serves every method
        console.rule(method)
        result = ds.run(ds.load_config(recipe, overrides), console=console, progress=False)
        if SUPERVISED not in per_arm:
            per_arm[SUPERVISED] = {s: r["metrics"] for s, r in result.arms["baseline"].items()}
            seconds[SUPERVISED] = sum(r["seconds"] for r in result.arms["baseline"].values())
        elif "baseline" in result.arms:  # the recipes share the baseline: same student, noise, steps
            for s, r in result.arms["baseline"].items():
                a, b = r["metrics"]["accuracy"], per_arm[SUPERVISED][s]["accuracy"]
                if abs(a - b) > 1e-6:
                    raise SystemExit(f"{recipe}: its supervised-only arm differs from the first ({a} vs {b})")
        names = ["gen-1", "gen-2"] if method == "noisy student" else ["distilled"]
        for arm, name in zip(arms, names):
            per_arm[arm] = {s: r["metrics"] for s, r in result.arms[name].items()}
            seconds[arm] = sum(r["seconds"] for r in result.arms[name].values())
        save()
    save()
    return 0


def pixel_probes(recipe: str, overrides: list[str], seeds: list[int]) -> dict[int, dict[str, float]]:
    """The SSL task's probes on raw pixels: the same splits and the same few-label subsets per seed."""
    from distillery.tasks import task_class

    cfg = ds.load_config(recipe, overrides)
    task = task_class(cfg.task)(cfg, None)  # only its prepare(): the splits and few-label subsets
    e = cfg.eval
    out = {}
    for seed in seeds:
        data = task.prepare(seed)
        d = data.data
        z_train, z_test = d.labelled.x.flatten(1).float(), d.test.x.flatten(1).float()
        y, few = d.labelled.y, data.few
        knn = dict(k=e.knn_k, temperature=e.knn_temperature, num_classes=d.num_classes)
        seed_split = cfg.data.split_seed
        out[seed] = {
            "knn": 100.0 * knn_accuracy(z_train, y, z_test, d.test.y, **knn),
            "probe": 100.0
            * linear_probe(z_train, y, z_test, d.test.y, seed=seed_split, max_iter=e.probe_max_iter),
            "knn_few": 100.0 * knn_accuracy(z_train[few], y[few], z_test, d.test.y, **knn),
            "probe_few": 100.0
            * linear_probe(
                z_train[few], y[few], z_test, d.test.y, seed=seed_split, max_iter=e.probe_max_iter
            ),
        }
    return out


def write(args, argv, console, stem, budget, per_arm, seconds, total, history) -> None:
    ssl_rows = {a: per_arm[a] for a in [PIXELS, UNTRAINED, *SSL] if a in per_arm}
    semi_rows = {a: per_arm[a] for a in SEMI_ROWS if a in per_arm}
    results: dict[str, dict] = {}
    untrained = {s: m["knn"] for s, m in per_arm.get(UNTRAINED, {}).items()}
    for arm, by_seed in ssl_rows.items():
        stats = {k: mean_std([m[k] for m in by_seed.values()]) for k in SSL_METRICS}
        if arm in SSL and untrained:
            stats["knn_vs_untrained"] = paired_difference(
                {s: m["knn"] for s, m in by_seed.items()}, untrained
            )
        stats["train_seconds_per_seed"] = seconds.get(arm, 0.0) / len(by_seed)
        results[arm] = stats
    sup = {s: m["accuracy"] for s, m in per_arm.get(SUPERVISED, {}).items()}
    for arm, by_seed in semi_rows.items():
        stats = {k: mean_std([m[k] for m in by_seed.values()]) for k in ("accuracy", "ece", "nll")}
        if arm != SUPERVISED and sup:
            stats["accuracy_vs_supervised"] = paired_difference(
                {s: m["accuracy"] for s, m in by_seed.items()}, sup
            )
        stats["train_seconds_per_seed"] = seconds.get(arm, 0.0) / len(by_seed)
        results[arm] = stats
    targets = verdicts(results)
    record = {
        "benchmark": "self_supervised",
        **budget,
        "recipes": {**SSL, **SEMI},
        "results": results,
        "targets": targets,
        "per_seed": per_arm,
        "train_seconds": seconds,
        "arms_not_run": [a for a in [*SSL, *SEMI_ROWS] if a not in per_arm],
        "seconds": total,
        "command": "python benchmarks/self_supervised.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "earlier_commands": history,
    }
    table = markdown(results, targets, len(args.seeds))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(table + "\n")
    console.print(f"total {total:.0f}s; wrote {args.out / stem}.json and .md")


def verdicts(results: dict) -> dict:
    """The issue's three targets, measured."""
    out: dict[str, dict] = {}
    ssl = {a: r for a, r in results.items() if a in SSL}
    if ssl:
        best = max(ssl, key=lambda a: ssl[a]["knn"]["mean"])
        pixels = results.get(PIXELS, {}).get("knn", {}).get("mean", RAW_PIXEL_KNN)
        out["ssl_knn_beats_pixels"] = {
            "best": best, "knn": ssl[best]["knn"]["mean"], "pixels": pixels,
            "met": ssl[best]["knn"]["mean"] > pixels,
        }  # fmt: skip
        if SUPERVISED in results:
            few = max(ssl, key=lambda a: ssl[a]["probe_few"]["mean"])
            gap = ssl[few]["probe_few"]["mean"] - results[SUPERVISED]["accuracy"]["mean"]
            out["ssl_few_probe_vs_supervised"] = {"best": few, "gap": gap, "needed": 3.0, "met": gap >= 3.0}
    semi = {a: r for a, r in results.items() if "accuracy_vs_supervised" in r}
    if semi:
        best = max(semi, key=lambda a: semi[a]["accuracy"]["mean"])
        gap = semi[best]["accuracy_vs_supervised"]["mean"]
        out["semi_vs_supervised"] = {"best": best, "gap": gap, "needed": 5.0, "met": gap >= 5.0}
    return out


def markdown(results: dict, targets: dict, n: int) -> str:
    lines = [
        f"Representations (test split, mean ± std over {n} seeds; the few-label probes use 600 labels):",
        "",
        "| method | k-NN % | linear probe % | k-NN 600 labels % | probe 600 labels % | Δ k-NN vs untrained (paired) "
        "| train s / seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        if arm not in (PIXELS, UNTRAINED, *SSL):
            continue
        d = r.get("knn_vs_untrained")
        delta = "-" if d is None else f"{fmt(d)} ({sum(v > 0 for v in d['per_seed'].values())}/{n})"
        lines.append(
            f"| {arm} | "
            + " | ".join(fmt(r[k]) for k in SSL_METRICS)
            + f" | {delta} | {r['train_seconds_per_seed']:.0f} |"
        )
    lines += ["", "Semi-supervised, 600 labels (test accuracy):", "",
              "| method | accuracy % | Δ vs supervised only (paired) | ECE % | train s / seed |", "|---|---|---|---|---|"]  # fmt: skip
    for arm, r in results.items():
        if "accuracy" not in r:
            continue
        d = r.get("accuracy_vs_supervised")
        delta = "-" if d is None else f"{fmt(d)} ({sum(v > 0 for v in d['per_seed'].values())}/{n})"
        lines.append(
            f"| {arm} | {fmt(r['accuracy'])} | {delta} | {fmt(r['ece'])} | {r['train_seconds_per_seed']:.0f} |"
        )
    if targets:
        lines += ["", "Targets:", ""]
        t = targets.get("ssl_knn_beats_pixels")
        if t:
            lines.append(f"- best SSL k-NN ({t['best']}, {t['knn']:.2f}) vs raw pixels ({t['pixels']:.2f}): "
                         f"{'met' if t['met'] else 'missed'}")  # fmt: skip
        t = targets.get("ssl_few_probe_vs_supervised")
        if t:
            lines.append(f"- best 600-label probe ({t['best']}) - supervised only: {t['gap']:+.2f} points "
                         f"(needed +3): {'met' if t['met'] else 'missed'}")  # fmt: skip
        t = targets.get("semi_vs_supervised")
        if t:
            lines.append(f"- best semi-supervised ({t['best']}) - supervised only: {t['gap']:+.2f} points "
                         f"(needed +5): {'met' if t['met'] else 'missed'}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
