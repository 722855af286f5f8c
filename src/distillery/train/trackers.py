"""Experiment trackers through Accelerate's tracker API (``output.report_to``).

One tracker run per distillery run: the resolved config is logged as hyperparameters (flattened to
dotted keys), and every training and evaluation record of every arm as metrics named
``seed-<s>/<arm>/<split>/<name>`` at the arm's step. Offline modes are the trackers' own: MLflow
writes to ``MLFLOW_TRACKING_URI`` (a local ``file:`` store works without a server), Weights & Biases
honours ``WANDB_MODE=offline``. TensorBoard stays available as ``output.tensorboard`` (per-arm event
files in the run folder) and can also be named here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distillery.errors import ConfigError

# name in report_to -> the package it needs (what to pip install)
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
SETTINGS = {
    "mlflow": " (MLFLOW_TRACKING_URI: a server, or a local store such as file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true)",
    "wandb": " (WANDB_MODE=offline works without an account)",
}
PIP_NAMES = {"mlflow": "mlflow (or mlflow-skinny)", "comet_ml": "comet-ml"}


def check_trackers(names: list[str]) -> None:
    """Every tracker named is known and installed; a ConfigError naming the package otherwise."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"output.report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"output.report_to: {name!r} needs the package {PIP_NAMES.get(name, TRACKERS[name])}, which is not "
                f"installed; pip install it, or remove {name!r} from output.report_to"
            )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> ``{"train.optimizer.lr": 0.003, ...}``; lists and None as JSON text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class Trackers:
    """The trackers of one run (main process only; an empty set is a no-op)."""

    def __init__(self, trackers: list[Any]) -> None:
        self._trackers = trackers

    @classmethod
    def start(cls, names: list[str], run_dir: Path, project: str, config: Mapping[str, Any]) -> Trackers:
        if not names:
            return cls([])
        check_trackers(names)
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        run_name = f"{project}-{Path(run_dir).name}"
        started = []
        for name in names:
            cls_ = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls_(run_name, Path(run_dir) / "trackers")
            elif name == "mlflow":
                tracker = cls_(experiment_name=project, run_name=run_name)
            elif name == "aim":
                tracker = cls_(run_name, logging_dir=str(run_dir))
            else:
                tracker = cls_(run_name)
            try:
                tracker.start()
                tracker.store_init_configuration(flatten(config))
            except Exception as exc:  # a tracker's own settings (URI, credentials, offline mode)
                cls(started).finish()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(
                    f"output.report_to: the {name} tracker could not start ({type(exc).__name__}: {first}); check "
                    f"its settings{SETTINGS.get(name, '')}, or remove {name!r} from output.report_to"
                ) from None
            started.append(tracker)
        return cls(started)

    def scoped(self, prefix: str) -> ScopedTrackers:
        return ScopedTrackers(self, prefix)

    def log(self, values: Mapping[str, Any], step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []

    def __bool__(self) -> bool:
        return bool(self._trackers)


class ScopedTrackers:
    """What one arm logs: ``<prefix>/<split>/<name>`` at the arm's step."""

    def __init__(self, trackers: Trackers, prefix: str) -> None:
        self.trackers, self.prefix = trackers, prefix

    def log(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        if self.trackers:
            self.trackers.log({f"{self.prefix}/{split}/{k}": v for k, v in values.items()}, step)


__all__ = ["TRACKERS", "ScopedTrackers", "Trackers", "check_trackers", "flatten"]
