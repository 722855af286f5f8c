"""Per-step metrics: a JSONL file in the run directory, and TensorBoard when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.fileio import write_atomic


class MetricLog:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl``.

    Each record has ``step`` and ``split`` (``"train"`` or ``"eval"``) and the values logged. On
    resume, :meth:`truncate` drops the records written after the checkpoint being resumed, so the file
    never holds two histories.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool | None = None, trackers=None) -> None:
        self.trackers = trackers  # e.g. ScopedTrackers: every record goes to them too
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard is not False:
                self._writer = _tensorboard_writer(
                    Path(run_dir) / "tensorboard", required=tensorboard is True
                )

    def truncate(self, step: int) -> int:
        """Keep the records of steps ``<= step`` (``0``: start the log afresh). A line that is not a
        complete JSON record -- the torn end of a write cut short by a crash or a full disk -- is
        dropped; returns how many lines were dropped that way."""
        if self.path is None or not self.path.is_file():
            return 0
        records, torn = _parse(self.path.read_text())
        keep = [line for line, rec in records if rec["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in keep))
        return torn

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if self.path is None:
            return
        record = {"step": step, "split": split, **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{split}/{k}", v, step)
        if self.trackers is not None:
            self.trackers.log(step, split, values)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _parse(text: str) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """The complete records of a metrics log as (line, record), and the number of torn lines."""
    records, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append((line, rec))
        else:
            torn += 1
    return records, torn


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [rec for _, rec in _parse(path.read_text())[0]]
    return [r for r in records if split is None or r["split"] == split]


def _tensorboard_writer(directory: Path, required: bool):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if required:
            raise
        return None
    return SummaryWriter(str(directory))
