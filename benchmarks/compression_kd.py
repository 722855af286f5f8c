"""Compressed students with and without distillation: int8 QAT and 50% / 80% magnitude pruning.

Every row trains the student of ``fashion-mnist-qat-kd`` (a small CNN, 54,000 training images, the same
steps) twice per seed, with cross-entropy and with cross-entropy + KD from the full-precision CNN
teacher (trained once per seed and cached), paired over seeds: uncompressed (float), int8
quantization-aware (evaluated as the converted int8 model), and pruned along Zhu & Gupta's cubic
schedule to 50% and 80% sparsity. The accuracy lost to compression is measured against the
uncompressed CE student of the same seed, and what KD recovers of it is the compressed KD student's
gain over the compressed CE student. Target: KD recovers at least half of the accuracy lost.

    python benchmarks/compression_kd.py                      # Fashion-MNIST, seeds 0 1 2
    python benchmarks/compression_kd.py --labels 10000       # 10,000 labels + 44,000 unlabelled transfer images
    python benchmarks/compression_kd.py --dataset digits     # minutes
    python benchmarks/compression_kd.py --quick              # a smoke test of the script

Writes ``benchmarks/results/compression_kd-<dataset>.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import distillery as ds
from distillery.report.summary import mean_std, paired_difference

RESULTS = Path(__file__).resolve().parent / "results"
QAT_ROW = "int8 QAT (x86, per-channel weights)"
TARGET_RECOVERY = 0.5

ROWS: dict[str, dict[str, Any] | None] = {
    "float (uncompressed)": None,
    "int8 QAT (x86, per-channel weights)": {"method": "qat", "backend": "x86", "per_channel": True},
    "pruned 50%": {"method": "prune", "sparsity": 0.5, "start": 0.1, "end": 0.7, "every": 20},
    "pruned 80%": {"method": "prune", "sparsity": 0.8, "start": 0.1, "end": 0.7, "every": 20},
}

DIGITS = [  # the same comparison on scikit-learn digits, in minutes
    "data={name: digits, validation: 130, labelled: 1170, transfer: 0, test: 497}",
    "teacher.model={name: cnn, channels: [24, 48, 48], dropout: 0.3}",
    "student={name: cnn, channels: [8, 16], pool_every: 1, dropout: 0.0}",
    "teacher.train.steps=600",
    "train.steps=1500",
    "train.batch_size=64",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--labels",
        type=int,
        help="Fashion-MNIST: labelled training images (the CE arms' data); the rest of the 54,000 become the "
        "distilled arms' unlabelled transfer set (default: all 54,000 labelled, no transfer set)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts: checks the script, not the methods"
    )
    p.add_argument(
        "--student-channels",
        type=int,
        nargs="+",
        metavar="C",
        help="Fashion-MNIST: the student CNN's channels (default: the recipe's 4 8)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    p.add_argument(
        "--tables-from", type=Path, metavar="JSON", help="do not train: rewrite the table of an earlier run"
    )
    args = p.parse_args(argv)

    console = Console()
    if args.tables_from is not None:
        record = json.loads(args.tables_from.read_text())
        args.seeds, args.dataset, args.labels = record["seeds"], record["dataset"], record.get("labels")
        text = markdown(summarize(record["results"]), args)
        args.tables_from.with_suffix(".md").write_text(text + "\n")
        print(text)
        return 0
    common = [f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}", "train.eval_every=0"]
    if args.dataset == "digits":
        common += DIGITS
    if args.student_channels and args.dataset != "digits":
        common.append(f"student.channels={json.dumps(args.student_channels)}")
    if args.dataset != "digits" and args.labels is not None:
        if not 0 < args.labels < 54000:
            p.error("--labels must be between 1 and 53,999 (54,000 training images after validation)")
        common += [f"data.labelled={args.labels}", f"data.transfer={54000 - args.labels}"]
    if args.quick:
        common += ["train.steps=20", "teacher.train.steps=20"]
    t0 = time.perf_counter()
    per_row: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for row, compress in ROWS.items():
        console.rule(row)
        overrides = [*common, f"name=compression-kd-{args.dataset}", f"compress={json.dumps(compress)}"]
        result = ds.run(ds.load_config("fashion-mnist-qat-kd", overrides), console=console, progress=False)
        per_row[row] = {
            arm: {s: {"metrics": r["metrics"], "compression": r.get("compression"), "params": r["params"],
                      "seconds": r["seconds"]} for s, r in result.arms[arm].items()}
            for arm in ("baseline", "distilled")
        }  # fmt: skip
        per_row[row]["teacher"] = {s: t["metrics"] for s, t in result.teachers.items()}
    seconds = time.perf_counter() - t0

    summary = summarize(per_row)
    text = markdown(summary, args)
    print(text)
    record = {
        "benchmark": "compression_kd",
        "dataset": args.dataset,
        "seeds": args.seeds,
        "labels": args.labels,
        "student_channels": args.student_channels,
        "quick": args.quick,
        "rows": ROWS,
        "results": per_row,
        "summary": summary,
        "seconds": seconds,
        "command": "python benchmarks/compression_kd.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    labels = f"-labels{args.labels}" if args.labels is not None and args.dataset != "digits" else ""
    width = f"-student{'x'.join(map(str, args.student_channels))}" if args.student_channels else ""
    stem = f"compression_kd-{args.dataset}{labels}{width}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(text + "\n")
    console.print(f"total {seconds:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


def _acc(by_seed: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {s: r["metrics"]["accuracy"] for s, r in by_seed.items()}


def summarize(per_row: dict[str, dict]) -> dict[str, dict[str, Any]]:
    float_ce = _acc(per_row["float (uncompressed)"]["baseline"])
    out = {}
    for row, arms in per_row.items():
        ce, kd = _acc(arms["baseline"]), _acc(arms["distilled"])
        lost = paired_difference(float_ce, ce)  # float CE - compressed CE
        gain = paired_difference(kd, ce)  # compressed KD - compressed CE
        entry: dict[str, Any] = {
            "ce": mean_std(list(ce.values())),
            "kd": mean_std(list(kd.values())),
            "kd_minus_ce": gain,
            "lost": lost,
            "teacher": mean_std([t["accuracy"] for t in arms["teacher"].values()]),
        }
        if row != "float (uncompressed)":
            entry["recovered"] = gain["mean"] / lost["mean"] if lost["mean"] > 0 else None
        comp = [r["compression"] for r in arms["distilled"].values() if r["compression"]]
        if comp:
            entry["compression"] = {k: statistics.mean(c[k] for c in comp) for k, v in comp[0].items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        entry["params"] = next(iter(arms["distilled"].values()))["params"]
        out[row] = entry
    return out


def _pm(stat: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.2f} ± {stat['std']:.2f}"


def markdown(summary: dict[str, dict[str, Any]], args) -> str:
    n = len(args.seeds)
    first = next(iter(summary.values()))
    data = (
        f", {args.labels:,} labelled images (the CE arms) + {54000 - args.labels:,} unlabelled transfer images (the KD arms)"
        if args.labels is not None and args.dataset != "digits"
        else ""
    )
    lines = [
        f"{args.dataset}{data}, mean ± std over {n} seeds (teacher {first['teacher']['mean']:.2f}%); lost = the "
        "uncompressed CE student's accuracy minus the compressed CE student's (same seed); recovered = "
        "(compressed KD - compressed CE) / lost; size: `torch.save` of the stored model (int8: the converted "
        "model's state; pruned: CSR weights, int32 indices); latency: 256 test images, one thread, median of 20.",
        "",
        "| student | CE accuracy % | KD accuracy % | KD - CE (wins) | lost to compression | recovered by KD | "
        "target (>= 50%) | size (KiB) | latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, e in summary.items():
        c = e.get("compression", {})
        if "int8_bytes" in c:
            size = f"{c['int8_bytes'] / 1024:.0f} (float {c['float_bytes'] / 1024:.0f})"
            latency = f"{c['int8_latency_ms']:.1f} (float {c['float_latency_ms']:.1f})"
        elif "sparse_bytes" in c:
            size = f"{c['sparse_bytes'] / 1024:.0f} (dense {c['dense_bytes'] / 1024:.0f})"
            latency = f"{c['latency_ms']:.1f} (dense kernels)"
        elif row == "float (uncompressed)" and "int8_bytes" in summary.get(QAT_ROW, {}).get(
            "compression", {}
        ):
            q = summary[QAT_ROW]["compression"]  # the QAT row's float model: the same architecture, fp32
            size, latency = f"{q['float_bytes'] / 1024:.0f}", f"{q['float_latency_ms']:.1f}"
        else:
            size, latency = "-", "-"
        recovered = e.get("recovered")
        if row == "float (uncompressed)":
            lost_cell, rec_cell, target = "-", "-", "-"
        else:
            lost_cell = _pm(e["lost"], signed=True)
            if recovered is None:
                rec_cell, target = "nothing lost", "-"
            else:
                rec_cell = f"{100 * recovered:.0f}%"
                target = "met" if recovered >= TARGET_RECOVERY else "missed"
        gain = e["kd_minus_ce"]
        lines.append(
            f"| {row} | {_pm(e['ce'])} | {_pm(e['kd'])} | {gain['mean']:+.2f} ({gain['wins']}/{n}) | {lost_cell} | "
            f"{rec_cell} | {target} | {size} | {latency} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
