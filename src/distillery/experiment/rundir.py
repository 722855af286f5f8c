"""The run folder: where it is, what a resumed run must agree with, and atomic writes into it."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import broadcast_object_list
from rich.console import Console

from distillery.config import dump_config, validate_config
from distillery.errors import ConfigError
from distillery.tasks import RunConfigBase, RunContext
from distillery.train import make_accelerator


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _comparable(cfg: RunConfigBase) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    data.pop("output", None)
    return data


def resolve_run_dir(cfg: RunConfigBase, resume: bool) -> Path:
    """``output.dir`` if set; on resume the newest run of this config's name; else a new timestamped dir."""
    if cfg.output.dir is not None:
        run_dir = Path(cfg.output.dir)
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run directory {run_dir} already holds a run; pass --resume to continue it, or choose another "
                "output.dir"
            )
        return run_dir
    parent = Path(cfg.output.root) / cfg.name
    if resume:
        runs = sorted(p for p in parent.glob("*") if (p / "config.yaml").is_file()) if parent.is_dir() else []
        if not runs:
            raise ConfigError(
                f"--resume: no earlier run of {cfg.name!r} under {parent}; run it first without --resume"
            )
        return runs[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = parent / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{stamp}-{n}"
    return run_dir


def read_run_config(run_dir: Path) -> RunConfigBase:
    """The resolved config saved in ``run_dir/config.yaml``."""
    path = run_dir / "config.yaml"
    return validate_config(yaml.safe_load(path.read_text()), source=str(path))


def check_resume_config(run_dir: Path, cfg: RunConfigBase) -> None:
    """A resumed run must have the config of the run it continues (the output section aside)."""
    if not (run_dir / "config.yaml").is_file():
        return
    old, new = _comparable(read_run_config(run_dir)), _comparable(cfg)
    if old != new:
        diffs = sorted(_diff_keys(old, new))
        raise ConfigError(
            f"--resume: the config differs from the one of {run_dir} in {', '.join(diffs[:8])}; resume with the same "
            "config and overrides, or start a new run"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def start_run(
    cfg: RunConfigBase, resume: bool, console: Console | None, progress: bool, accelerator=None
) -> RunContext:
    """What every run does first: the accelerator, a console that only the main process prints to,
    the run directory (agreed by all processes) with the resolved config written into it."""
    acc = accelerator or make_accelerator()
    main = acc.is_main_process
    console = console or Console(quiet=not main)
    if not main:
        console.quiet = True
    progress = progress and main and console.is_terminal
    holder = [str(resolve_run_dir(cfg, resume)) if main else None]
    if acc.num_processes > 1:
        broadcast_object_list(holder)
    run_dir = Path(holder[0])
    if resume:
        check_resume_config(run_dir, cfg)
    if main:
        write_atomic(run_dir / "config.yaml", dump_config(cfg))
    acc.wait_for_everyone()
    return RunContext(accelerator=acc, console=console, progress=progress, run_dir=run_dir)
