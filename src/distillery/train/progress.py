"""Progress of the training loop: step/total, loss parts, samples/s and ETA, wherever the output goes.

- **A terminal** (or a notebook): one live line, ``label [bar] step/total | losses | samples/s | ETA``,
  fitted to the terminal's width every time it is drawn: the loss parts are cut first, then the
  speed, the bar and the label, so that ``step/total`` and the ETA are never cut off.
- **Anything else** (a pipe, a log file under nohup, CI, SLURM): a plain line every
  ``DISTILLERY_PROGRESS_EVERY`` seconds (default 30; ``0``: after every step), flushed at once::

      seed 0 distilled: step 120/500 (24%) | loss 0.8123 ce 0.5100 kd 0.3000 | 1,234 samples/s | elapsed 0:00:10 | ETA 0:00:31
"""

from __future__ import annotations

import math
import os
import time

from rich import get_console
from rich.console import Console
from rich.progress import Progress, ProgressColumn
from rich.text import Text

from distillery.errors import ConfigError

PROGRESS_ENV = "DISTILLERY_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def progress_interval(value: str | None = None) -> float:
    """Seconds between plain progress lines: ``value``, else ``$DISTILLERY_PROGRESS_EVERY``, else 30.

    Example:
        >>> progress_interval("5"), progress_interval("0")
        (5.0, 0.0)

    Raises:
        ConfigError: the value is not a finite number of seconds >= 0.
    """
    raw = os.environ.get(PROGRESS_ENV) if value is None else value
    if raw is None or raw.strip() == "":
        return DEFAULT_EVERY_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            f"{PROGRESS_ENV}={raw!r}: give the seconds between progress lines as a number >= 0 (default "
            f"{DEFAULT_EVERY_S:g}; 0 prints a line after every step)"
        )
    return seconds


def clock(seconds: float | None) -> str:
    """``h:mm:ss`` (``-:--:--`` when unknown).

    Example:
        >>> clock(3725.2), clock(None)
        ('1:02:05', '-:--:--')
    """
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = round(max(seconds, 0.0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fit_line(
    label: str, step: str, eta: str, losses: str, speed: str, bar: tuple[int, int], width: int
) -> list[tuple[str, str | None]]:
    """The pieces ``(text, style)`` of one progress line that fit in ``width`` characters.

    ``bar`` is ``(filled, total)``. What does not fit goes in this order: the loss parts (cut to fit,
    then dropped), the speed, the bar (shrunk, then dropped), the label (cut); ``step`` and ``eta``
    always stay.

    Example:
        >>> line = fit_line("seed 0 distilled", "120/500", "ETA 0:00:31", "loss 0.81 ce 0.51", "99 samples/s", (1, 4), 30)
        >>> "".join(text for text, _ in line)
        'seed 0 di… 120/500 ETA 0:00:31'
    """
    bar_w = 24
    label_w = len(label)
    loss_text, speed_text = losses, speed

    def length() -> int:
        parts = [label_w, bar_w, len(step), len(loss_text), len(speed_text), len(eta)]
        shown = [p for p in parts if p > 0]
        return sum(shown) + len(shown) - 1

    if length() > width and loss_text:  # cut the losses, or drop them below 10 characters
        room = len(loss_text) - (length() - width)
        loss_text = loss_text[: room - 1] + "…" if room >= 10 else ""
    if length() > width:
        speed_text = ""
    if length() > width:
        bar_w = max(0, bar_w - (length() - width))
        if bar_w < 6:
            bar_w = 0
    if length() > width:
        label_w = max(0, label_w - (length() - width))
        if label_w < 4:
            label_w = 0
    pieces: list[tuple[str, str | None]] = []
    if label_w:
        pieces.append((label if label_w >= len(label) else label[: label_w - 1] + "…", "bold"))
    if bar_w:
        filled, total = bar
        done = min(bar_w, round(bar_w * filled / max(total, 1)))
        pieces += [("━" * done, "bar.complete"), ("━" * (bar_w - done), "bar.back")]
    pieces.append((step, None))
    for text in (loss_text, speed_text):
        if text:
            pieces.append((text, None))
    pieces.append((eta, "progress.remaining"))
    out: list[tuple[str, str | None]] = []
    for i, (text, style) in enumerate(pieces):
        joined_bar = i > 0 and style == "bar.back" and pieces[i - 1][1] == "bar.complete"
        if out and not joined_bar:
            out.append((" ", None))
        out.append((text, style))
    return out


class _LineColumn(ProgressColumn):
    """The whole progress line as one column, fitted to the console's current width."""

    def __init__(self, owner: TrainProgress) -> None:
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        o = self.owner
        text = Text(no_wrap=True, overflow="crop")
        width = max(o.console.width - 1, 10)
        for piece, style in fit_line(
            o.label, o.step_text(), "ETA " + clock(o.eta()), o.losses, o.speed(), (o.step, o.total), width
        ):
            text.append(piece, style=style)
        return text


class TrainProgress:
    """Progress of one :func:`~distillery.train.fit`: a live line on a terminal, plain lines elsewhere
    (see the module docstring); silent when disabled.

    Args:
        label: what is trained (``seed 0 distilled``).
        total: the run's optimizer steps; ``start``: the step it starts (resumes) from.
        enabled: False shows nothing.
        console: where to draw (default: rich's global console on stdout, which knows whether stdout is
            a terminal).
        every_s: seconds between plain lines (default: :func:`progress_interval`).
    """

    def __init__(
        self,
        label: str,
        total: int,
        start: int = 0,
        enabled: bool = True,
        console: Console | None = None,
        every_s: float | None = None,
    ):
        self.enabled = enabled
        self.label = label
        self.total = total
        self.step = start
        self.losses = ""
        self._t0 = time.perf_counter()
        self._start = start
        self._samples = 0
        self._last_line = self._t0
        self.progress: Progress | None = None
        if not enabled:
            return
        self.console = console or get_console()
        self.every_s = progress_interval() if every_s is None else every_s
        self.live = self.console.is_terminal or self.console.is_jupyter
        if self.live:
            self.progress = Progress(
                _LineColumn(self), console=self.console, transient=True, refresh_per_second=4
            )
            self.task = self.progress.add_task(label, total=total, completed=start)
            self.progress.start()

    # ---- the fields of a line --------------------------------------------------------------------

    def step_text(self) -> str:
        return f"{self.step}/{self.total}"

    def eta(self) -> float | None:
        """Seconds left at the mean speed of this run so far (None before its first step)."""
        done = self.step - self._start
        if done <= 0:
            return None
        return (self.total - self.step) * (time.perf_counter() - self._t0) / done

    def speed(self) -> str:
        if self._samples == 0:
            return ""
        return f"{self.samples_per_second:,.0f} samples/s"

    def line(self) -> str:
        """The plain progress line (logs and pipes)."""
        pct = 100.0 * self.step / max(self.total, 1)
        parts = [f"{self.label}: step {self.step_text()} ({pct:.0f}%)"]
        parts += [p for p in (self.losses, self.speed()) if p]
        parts += [f"elapsed {clock(time.perf_counter() - self._t0)}", f"ETA {clock(self.eta())}"]
        return " | ".join(parts)

    # ---- updates ---------------------------------------------------------------------------------

    def update(self, step: int, samples: int, parts: dict[str, float] | None = None) -> None:
        self._samples += samples
        self.step = step
        if parts is not None:
            self.losses = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    @property
    def samples_per_second(self) -> float:
        return self._samples / max(time.perf_counter() - self._t0, 1e-9)
