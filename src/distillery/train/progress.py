"""A progress bar for the training loop: step, loss parts, samples/s, ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Shows ``label [bar] step/total | loss parts | samples/s | ETA``; silent when disabled."""

    def __init__(
        self, label: str, total: int, start: int = 0, enabled: bool = True, console: Console | None = None
    ):
        self.enabled = enabled
        self.total = total
        self._t0 = time.perf_counter()
        self._start = start
        self._samples = 0
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(label, total=total, completed=start, losses="", speed="")
        self.progress.start()

    def update(self, step: int, samples: int, parts: dict[str, float] | None = None) -> None:
        self._samples += samples
        if not self.enabled:
            return
        fields = {}
        if parts is not None:
            fields["losses"] = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
            elapsed = time.perf_counter() - self._t0
            fields["speed"] = f"{self._samples / max(elapsed, 1e-9):,.0f} samples/s"
        self.progress.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()

    @property
    def samples_per_second(self) -> float:
        return self._samples / max(time.perf_counter() - self._t0, 1e-9)
