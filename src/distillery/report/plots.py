"""Figures for run reports (matplotlib, written as PNG without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def learning_curves(
    curves: dict[str, list[list[dict[str, Any]]]],
    path: Path,
    metric: str = "accuracy",
    reference: dict[str, float] | None = None,
    title: str = "",
    split: str = "validation",
) -> Path:
    """Plot ``metric`` against steps, mean and min-max band over seeds, one line per arm.

    ``curves[label]`` is a list (one per seed) of evaluation records ``{"step": ..., metric: ...}``;
    ``reference`` draws horizontal lines (e.g. the teacher's accuracy); ``split`` names the data the
    records were evaluated on (the axis label).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        steps = [rec["step"] for rec in runs[0]]
        values = np.array(
            [[rec[metric] for rec in run[: len(steps)]] for run in runs if len(run) >= len(steps)]
        )
        mean = values.mean(0)
        band = ", band: min-max over seeds" if len(values) > 1 else ""
        (line,) = ax.plot(
            steps, mean, label=f"{label} (mean of {len(values)} seed{'s' * (len(values) > 1)}{band})"
        )
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1)
        ax.annotate(
            label, (0.01, value), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{split} {metric}" + (" (%)" if metric in ("accuracy", "ece") else ""))
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
