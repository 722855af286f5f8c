"""Model cards and hub uploads: what a saved student is, where it came from, how to get it again.

Every arm's saved model folder gets a ``README.md`` in the Hugging Face model-card format (YAML
metadata, then Markdown): the teacher it was distilled from and the teacher's metrics, the method
(teacher source and loss terms with their parameters), the data, the training settings, the test
metrics (evaluated once, after training) beside the paired baseline's, and the command that
reproduces the run. ``output.push_to_hub: <repo id>`` uploads the first seed's distilled student
folder after the run (:func:`hub_folder` is the folder it uploads).

A teacher trained by a run is saved in the teacher cache, and its entry gets a card too
(:func:`teacher_card`): its architecture and training settings, the data, its test metrics, the
training time, and how to reuse it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from distillery.fileio import write_atomic


def model_dir(arm_dir: Path) -> Path:
    """Where an arm's model lives: ``model/`` (saved with ``save_pretrained``) or the arm folder."""
    return arm_dir / "model" if (arm_dir / "model").is_dir() else arm_dir


def _metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    keys = sorted({k for metrics in rows.values() for k, v in metrics.items() if isinstance(v, (int, float))})
    if not keys:
        return ""
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, metrics in rows.items():
        cells = [f"{metrics[k]:.4g}" if isinstance(metrics.get(k), (int, float)) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    """``distillery <argv>`` as a user would type it (shell-quoted)."""
    return " ".join(shlex.quote(a) for a in ["distillery", *argv])


def model_card(
    cfg: Any,
    seed: int,
    arm: str,
    label: str,
    record: dict[str, Any],
    teacher: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    data: str,
    run_dir: Path,
    command: list[str] | None = None,
) -> str:
    """The ``README.md`` of one arm's saved model."""
    config = cfg.model_dump(mode="json")
    library = "transformers" if str(config.get("task")) == "lm" else "distillery"
    meta = {
        "library_name": library,
        "tags": ["distillery", "knowledge-distillation", str(config.get("task"))],
    }
    teacher_section = config.get("teacher")
    method = {k: config[k] for k in ("method", "loss") if config.get(k) is not None}
    rows = {label: record.get("metrics", {})}
    if baseline is not None and arm != "baseline":
        rows["paired baseline (same seed, same initial weights)"] = baseline.get("metrics", {})
    if teacher is not None:
        rows["teacher"] = teacher.get("metrics", {})
    parts = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.name}: {label} (seed {seed})",
        "",
        cfg.description.strip() if getattr(cfg, "description", "") else "",
        "",
        "Trained with distillery "
        f"({'distilled from a teacher' if teacher_section else 'no external teacher'}).",
        "",
        "## Teacher",
        "",
        "```yaml",
        yaml.safe_dump({"teacher": teacher_section}, sort_keys=False).strip(),
        "```",
        ""
        if teacher is None
        else f"Source: {teacher.get('source', '-')}"
        + (" (from the teacher cache)" if teacher.get("cached") else ""),
        "",
        "## Method",
        "",
        "```yaml",
        yaml.safe_dump(method or {"loss": None}, sort_keys=False).strip(),
        "```",
        "",
        "## Data",
        "",
        data,
        "",
        "## Training",
        "",
        f"{record.get('steps', '-')} steps on {record.get('train_examples', '-')} training examples, seed {seed}:",
        "",
        "```yaml",
        yaml.safe_dump({"train": config.get("train")}, sort_keys=False).strip(),
        "```",
        "",
        "## Results (test split, evaluated once after training)",
        "",
        _metrics_table(rows),
        "",
        "## Reproduce",
        "",
        "```bash",
        *([command_line(command)] if command else []),
        f"distillery run {run_dir / 'config.yaml'}   # the resolved config of this run",
        "```",
        "",
    ]
    return "\n".join(parts)


def teacher_card(
    cfg: Any,
    seed: int,
    info: dict[str, Any],
    data: str,
    run_dir: Path,
    command: list[str] | None = None,
    section: dict[str, Any] | None = None,
) -> str:
    """The ``README.md`` of a teacher that a run trained and saved in the teacher cache. ``section``: the
    config section of this teacher when it is not the run's ``teacher`` (a member of several)."""
    config = cfg.model_dump(mode="json")
    task = str(config.get("task"))
    meta = {"library_name": "distillery", "tags": ["distillery", "knowledge-distillation", "teacher", task]}
    entry = Path(str(info.get("source", ".")))
    reuse = (
        f"Runs whose teacher section, data and seed are the same reuse this entry automatically (cache key "
        f"`{info.get('cache_key', '-')}`; the key also covers the torch version and distillery's training code)."
    )
    if task == "classification":
        reuse += (
            " Another config can load it as a fixed teacher with the same `teacher.model`: "
            f"`teacher.train=null teacher.checkpoint={entry / 'model.safetensors'}`."
        )
    parts = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.name}: teacher (seed {seed})",
        "",
        "The teacher that this run trained before distilling its students, saved in distillery's teacher "
        "cache" + (f" ({info['params']:,} parameters)." if isinstance(info.get("params"), int) else "."),
        "",
        "## Architecture and training",
        "",
        "```yaml",
        yaml.safe_dump(
            {"teacher": config.get("teacher") if section is None else section}, sort_keys=False
        ).strip(),
        "```",
        "",
        f"Trained in {float(info.get('seconds', 0.0)):.1f} s, seed {seed}.",
        "",
        "## Data",
        "",
        data,
        "",
        "## Results (test split)",
        "",
        _metrics_table({"teacher": info.get("metrics", {})}),
        "",
        "## Reuse",
        "",
        reuse,
        "",
        "## Reproduce",
        "",
        "```bash",
        *([command_line(command)] if command else []),
        f"distillery run {run_dir / 'config.yaml'}   # the resolved config of the run that trained it",
        "```",
        "",
    ]
    return "\n".join(parts)


def write_model_card(arm_dir: Path, text: str) -> Path:
    path = model_dir(arm_dir) / "README.md"
    write_atomic(path, text)
    return path


def hub_folder(run_dir: Path, seed: int) -> Path:
    """The folder ``push_to_hub`` uploads: the distilled student of ``seed`` (its model card included)."""
    arms = sorted(p for p in (run_dir / f"seed-{seed}").iterdir() if p.is_dir() and p.name != "baseline")
    return model_dir(
        arms[-1] if "distilled" not in {p.name for p in arms} else run_dir / f"seed-{seed}" / "distilled"
    )


def push_to_hub(repo_id: str, folder: Path) -> str:
    """Upload ``folder`` to the hub repo ``repo_id`` (created if needed); the repo's URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        ignore_patterns=["checkpoints/*", "tensorboard/*", "metrics.jsonl", ".*"],
        commit_message="Upload a student distilled with distillery",
    )
    return f"https://huggingface.co/{repo_id}"


__all__ = [
    "command_line",
    "hub_folder",
    "model_card",
    "model_dir",
    "push_to_hub",
    "teacher_card",
    "write_model_card",
]
