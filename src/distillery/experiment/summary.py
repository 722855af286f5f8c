"""Aggregates of a run over seeds, the printed table and ``report.md``, for any task.

The columns are the task's :class:`~distillery.tasks.base.Metric` list (headline first). Every arm
other than the baseline gets paired differences to it on the paired metrics (mean +- std over seeds,
and in how many seeds it was better); the last trained arm is the run's main comparison.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from distillery.experiment.rundir import write_atomic
from distillery.report import fmt, learning_curves, mean_std, paired_difference
from distillery.tasks import BASELINE, Metric
from distillery.train.logging import read_metrics

TEACHER = "teacher"


def _present(metrics: tuple[Metric, ...], records: list[dict[str, Any]]) -> list[Metric]:
    return [m for m in metrics if records and m.key in records[0]["metrics"]]


def _aggregate_members(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    members = [r["members"] for r in records if "members" in r]
    if not members:
        return None
    return {
        name: {k: mean_std([m[name][k] for m in members]) for k in members[0][name]} for name in members[0]
    }


# The config sections that say which method ran.
METHOD_SECTIONS = ("method", "loss", "teacher")


def summarize(result) -> dict[str, Any]:
    """``summary.json``: per model mean +- std of every metric, paired differences to the baseline."""
    cfg, task = result.config, result.task
    models: dict[str, Any] = {}
    if result.teachers:
        teachers = list(result.teachers.values())
        models[TEACHER] = {
            "label": "teacher",
            **{
                m.key: mean_std([t["metrics"][m.key] for t in teachers])
                for m in _present(task.metrics, teachers)
            },
            "params": teachers[0]["params"],
            "seconds": mean_std([t["seconds"] for t in teachers]),
            "cached": sum(t["cached"] for t in teachers),
            "loaded": sum(bool(t.get("loaded")) for t in teachers),
        }
    for arm, by_seed in result.arms.items():
        if not by_seed:
            continue
        records = list(by_seed.values())
        models[arm] = {
            "label": task.label(arm),
            **{
                m.key: mean_std([r["metrics"][m.key] for r in records])
                for m in _present(task.metrics, records)
            },
            "params": records[0]["params"],
            "seconds": mean_std([r["seconds"] for r in records]),
            "train_examples": records[0].get("train_examples"),
        }
        members = _aggregate_members(records)
        if members is not None:
            models[arm]["members"] = members
        warnings = [f"seed {r['seed']}: {w}" for r in records for w in r.get("warnings", [])]
        if warnings:  # what a task found wrong with a trained arm (a collapsed self-supervised run)
            models[arm]["warnings"] = warnings
    paired_by_arm: dict[str, Any] = {}
    base = result.arms.get(BASELINE)
    if base:
        for arm, by_seed in result.arms.items():
            if arm == BASELINE or not by_seed:
                continue
            first = next(iter(by_seed.values()))["metrics"]
            paired_by_arm[arm] = {}
            for m in task.metrics:
                if not m.paired or m.key not in first:
                    continue
                stats = paired_difference(
                    {s: r["metrics"][m.key] for s, r in by_seed.items()},
                    {s: r["metrics"][m.key] for s, r in base.items()},
                )
                # seeds where the arm is strictly better than the baseline (a tie is not a win)
                sign = 1.0 if m.higher_is_better else -1.0
                stats["better"] = sum(sign * d > 0 for d in stats["per_seed"].values())
                paired_by_arm[arm][m.key] = stats
    trained = [a for a in task.arms() if a != BASELINE and a in paired_by_arm]
    main_arm = trained[-1] if trained else None
    # the first of the task's metrics that the arms report (an encoder run on plain text has no MRR)
    reported = [r["metrics"] for by_seed in result.arms.values() for r in by_seed.values()]
    headline = next((m.key for m in task.metrics if any(m.key in r for r in reported)), task.metrics[0].key)
    per_seed = []
    for seed in cfg.seeds:
        row: dict[str, Any] = {"seed": seed}
        if seed in result.teachers and headline in result.teachers[seed]["metrics"]:
            row[TEACHER] = result.teachers[seed]["metrics"][headline]
        for arm, by_seed in result.arms.items():
            if seed in by_seed and headline in by_seed[seed]["metrics"]:
                row[arm] = by_seed[seed]["metrics"][headline]
        per_seed.append(row)
    config = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else {}  # any config-like object
    return {
        "name": cfg.name,
        "task": cfg.task,
        "seeds": cfg.seeds,
        # what ran: the method (LM: token-level, on-policy with its lambda, ...), the loss terms with
        # their parameters, and the teacher
        "method": {k: config[k] for k in METHOD_SECTIONS if config.get(k) is not None},
        "headline": headline,
        "models": models,
        "paired_distilled_minus_baseline": paired_by_arm.get(main_arm, {}),
        "paired_arm": main_arm,
        "paired_vs_baseline": paired_by_arm,
        f"per_seed_{headline}": per_seed,
        "seconds": result.seconds,
    }


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def _columns(task, summary: dict[str, Any]) -> list[Metric]:
    return [m for m in task.metrics if any(m.key in s for s in summary["models"].values())]


def table(task, summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the summary table: one row per model, one column per metric present."""
    columns = _columns(task, summary)
    headers = ["model", *(m.header for m in columns), "params", "time"]
    rows = []
    for key, m in summary["models"].items():
        if key == TEACHER and m.get("loaded", 0) == len(summary["seeds"]):
            time_cell = "loaded"
        elif key == TEACHER and m["cached"] == len(summary["seeds"]):
            time_cell = "cached"
        else:
            time_cell = fmt(m["seconds"], 1) + " s"
        cells = [fmt(m[c.key], c.digits) if c.key in m else "-" for c in columns]
        rows.append([m["label"], *cells, f"{m['params']:,}", time_cell])
    return headers, rows


def _metric(task, key: str | None):
    """The task's metric named ``key`` (the first one if there is none of that name)."""
    return next((m for m in task.metrics if m.key == key), task.metrics[0])


def paired_lines(task, summary: dict[str, Any]) -> list[str]:
    """One sentence per compared arm: its paired difference to the baseline on the headline metric."""
    headline = _metric(task, summary.get("headline"))
    baseline = summary["models"].get(BASELINE, {}).get("label", "baseline")
    unit = " points" if headline.unit == "%" else ""
    lines = []
    for arm, stats in summary.get("paired_vs_baseline", {}).items():
        p = stats.get(headline.key)
        if not p or p["n"] == 0:
            continue
        label = summary["models"][arm]["label"]
        lines.append(
            f"paired {headline.header.removesuffix(' %')} difference, {label} - {baseline}: "
            f"{fmt(p, headline.digits, signed=True)}{unit} over {p['n']} seed(s); better in {p['better']}/{p['n']}"
        )
    return lines


def print_summary(result, console: Console) -> None:
    task, s = result.task, result.summary
    headers, rows = table(task, s)
    out = Table(title=f"{s['name']}: mean ± std over {len(s['seeds'])} seed(s)", title_justify="left")
    for h in headers:
        out.add_column(h, justify="left" if h == "model" else "right")
    for row in rows:
        out.add_row(*row)
    console.print(out)
    for section in task.sections(s):
        sub = Table(title=section.title, title_justify="left")
        for i, h in enumerate(section.headers):
            sub.add_column(h, justify="left" if i == 0 else "right")
        for row in section.rows:
            sub.add_row(*row)
        console.print(sub)
    for line in paired_lines(task, s):
        console.print(f"[bold]{line}[/bold]")
    console.print(f"total wall time {s['seconds']:.1f}s; report: {result.run_dir / 'report.md'}")


def _markdown(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def write_report(result) -> None:
    """``summary.json``, ``report.md`` and ``learning_curves.png`` in the run directory."""
    cfg, task, s, run_dir = result.config, result.task, result.summary, result.run_dir
    write_atomic(run_dir / "summary.json", json.dumps(s, indent=2))
    curves = {
        s["models"][arm]["label"]: [r.get("history", []) for r in by_seed.values()]
        for arm, by_seed in result.arms.items()
        if by_seed
    }
    # the curves of the first task metric evaluated during training (the headline, when it is)
    in_history = [
        m
        for m in task.metrics
        if any(m.key in rec for runs in curves.values() for run in runs for rec in run)
    ]
    headline = _metric(task, s.get("headline"))
    curve = in_history[0] if in_history else headline
    has_curves = bool(in_history)
    if has_curves:
        ref = (
            {"teacher (test)": s["models"][TEACHER][curve.key]["mean"]}
            if TEACHER in s["models"] and curve.key in s["models"][TEACHER]
            else None
        )
        learning_curves(
            curves,
            run_dir / "learning_curves.png",
            metric=curve.key,
            reference=ref,
            title=f"{cfg.name}: validation {curve.key} during training",
        )
    lines = [f"# {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [f"Mean ± standard deviation over seeds {cfg.seeds}, on the {task.dataset} test split.", ""]
    for arm, m in s["models"].items():
        text = task.description(arm) if arm != TEACHER else ""
        if text:
            lines.append(f"- **{m['label']}**: {text}.")
    docs = [f"*{m.header.removesuffix(' %')}*: {m.doc}" for m in _columns(task, s) if m.doc]
    lines += ["- " + "; ".join([*docs, "*time*: training wall time per seed"]) + ".", ""]
    lines += _markdown(*table(task, s))
    for line in paired_lines(task, s):
        lines += ["", f"**{line[0].upper() + line[1:]}.**"]
    for m in s["models"].values():
        for warning in m.get("warnings", []):
            lines += ["", f"**Warning, {m['label']}**: {warning}."]
    for section in task.sections(s):
        lines += ["", f"### {section.title}", "", *_markdown(section.headers, section.rows)]
    per_seed = s[f"per_seed_{headline.key}"]
    cols = ["seed"] + [k for k in s["models"] if any(k in r for r in per_seed)]
    names = {"seed": "seed", **{k: m["label"] for k, m in s["models"].items()}}
    lines += ["", f"## Per seed (test {headline.header})", ""]
    lines += ["| " + " | ".join(names[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in per_seed:
        cells = [str(r[c]) if c == "seed" else f"{r[c]:.{headline.digits}f}" for c in cols if c in r]
        lines.append("| " + " | ".join(cells) + " |")
    if has_curves:
        lines += [
            "",
            "## Learning curves",
            "",
            f"![validation {curve.key} during training](learning_curves.png)",
            "",
            "Evaluated on the validation split carved from the training data; the tables above are the test "
            "split, evaluated once after training.",
        ]
    losses = {
        s["models"][arm]["label"]: [read_metrics(run_dir / f"seed-{seed}" / arm, "train") for seed in by_seed]
        for arm, by_seed in result.arms.items()
        if by_seed and (run_dir / f"seed-{next(iter(by_seed))}" / arm / "metrics.jsonl").is_file()
    }
    if any(rec.get("loss") is not None for runs in losses.values() for run in runs for rec in run):
        learning_curves(
            losses,
            run_dir / "training_loss.png",
            metric="loss",
            title=f"{cfg.name}: training loss (the objective each arm minimises)",
            split="training",
        )
        lines += ["", "![training loss](training_loss.png)"]
    if s.get("method"):
        lines += ["", "## Method", "", "```yaml", yaml.safe_dump(s["method"], sort_keys=False).strip(), "```"]
    lines += ["", f"Total wall time: {s['seconds']:.1f} s. Resolved configuration: `config.yaml`.", ""]
    write_atomic(run_dir / "report.md", "\n".join(lines))
