"""Aggregates over seeds: mean +- std per model, and paired differences between arms."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": n}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Per-seed ``a - b`` over the seeds both have: mean, std, count of seeds where a > b."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = mean_std(diffs)
    out["wins"] = sum(d > 0 for d in diffs)
    out["per_seed"] = dict(zip(seeds, diffs))
    return out


def fmt(stat: dict[str, float], digits: int = 2, signed: bool = False) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "-"
    sign = "+" if signed else ""
    if stat["n"] == 1:
        return f"{stat['mean']:{sign}.{digits}f}"
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"


def saved_record(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON record of an earlier benchmark run at ``path`` (None when there is none), checked to
    have been run with the same ``settings`` (its top-level keys): resuming a benchmark only adds arms
    that are comparable to the saved ones.

    Raises:
        SystemExit: a saved value differs from ``settings`` (both are named).
    """
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if differ:
        raise SystemExit(
            f"--resume: {path} was run with other settings ({differ}: saved, now); "
            "rerun without --resume or with the saved settings"
        )
    return saved
