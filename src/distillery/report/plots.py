"""Figures for run reports (matplotlib, written as PNG without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) through a temporary name, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


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
    return _save(fig, path)


def image_grid(images, labels: list[int], path: Path, per_class: int = 8, title: str = "") -> Path:
    """A PNG of up to ``per_class`` images of each label, one row per label (grey-scale; each image
    scaled to its own range). ``images``: ``[N, C, H, W]`` (the first channel is shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(images, dtype=np.float32)
    classes = sorted(set(labels))
    rows = {c: [i for i, y in enumerate(labels) if y == c][:per_class] for c in classes}
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 0.6, len(classes) * 0.6), dpi=120, squeeze=False
    )
    for r, c in enumerate(classes):
        for k in range(per_class):
            ax = axes[r][k]
            ax.axis("off")
            if k < len(rows[c]):
                img = arr[rows[c][k]][0]
                lo, hi = float(img.min()), float(img.max())
                ax.imshow((img - lo) / (hi - lo + 1e-8), cmap="gray", vmin=0, vmax=1)
            if k == 0:
                ax.set_title(str(c), fontsize=6, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)
