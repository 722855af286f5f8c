"""Per-step metrics: a JSONL file in the run directory, and TensorBoard when it is installed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricLog:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl``.

    Each record has ``step`` and ``split`` (``"train"`` or ``"eval"``) and the values logged. On
    resume, :meth:`truncate` drops the records written after the checkpoint being resumed, so the file
    never holds two histories.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool | None = None) -> None:
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard is not False:
                self._writer = _tensorboard_writer(
                    Path(run_dir) / "tensorboard", required=tensorboard is True
                )

    def truncate(self, step: int) -> None:
        if self.path is None or not self.path.is_file():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if split is None or r["split"] == split]


def _tensorboard_writer(directory: Path, required: bool):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if required:
            raise
        return None
    return SummaryWriter(str(directory))
