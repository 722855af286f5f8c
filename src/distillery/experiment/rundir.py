"""The run folder: where it is, what a resumed run must agree with, and atomic writes into it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from rich.console import Console

from distillery.config import dump_config, read_yaml, validate_config
from distillery.errors import ConfigError
from distillery.fileio import write_atomic
from distillery.tasks import RunConfigBase, RunContext
from distillery.train import make_accelerator
from distillery.train.checkpoint import latest_checkpoint
from distillery.train.config import check_processes, run_mixed_precision
from distillery.train.launch import describe_processes, launch_warning, process_line
from distillery.train.progress import progress_interval

RUN_INFO = "run.json"


def _comparable(cfg: RunConfigBase) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    data.pop("output", None)
    return data


def _make_dir(path: Path, exist_ok: bool) -> bool:
    """Create ``path`` (and its parents); True when this call created it. Filesystem problems are
    user errors that name the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=exist_ok)
    except FileExistsError:
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"cannot create the run folder {path}: a file of that name is in the way; "
                "move it or choose another output.root / output.dir"
            ) from None
        raise
    except (NotADirectoryError, PermissionError, OSError) as exc:
        raise ConfigError(
            f"cannot create the run folder {path} ({exc.strerror or exc}); choose a writable output.root "
            "or output.dir"
        ) from None
    return True


def create_run_dir(cfg: RunConfigBase) -> Path:
    """A new run folder, created atomically and exclusively: ``output.dir`` if set (it must be absent
    or empty), else ``output.root/<name>/<timestamp>`` with a ``-2``, ``-3``... suffix when another
    run took that name first (two runs started in the same second get two folders)."""
    if cfg.output.dir is not None:
        run_dir = Path(cfg.output.dir)
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run directory {run_dir} already holds a run; pass --resume to continue it, or choose another "
                "output.dir"
            )
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output.dir {run_dir} is a file; choose a folder")
        _make_dir(run_dir, exist_ok=True)
        return run_dir
    parent = Path(cfg.output.root) / cfg.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            _make_dir(run_dir, exist_ok=False)
        except FileExistsError:
            continue
        return run_dir
    raise ConfigError(f"could not find a free run folder name under {parent}")


def find_resume_dir(cfg: RunConfigBase, console: Console | None = None) -> Path:
    """The run folder ``--resume`` continues: ``output.dir`` if set, else the newest folder under
    ``output.root/<name>`` whose saved config equals this one (the output section aside)."""
    if cfg.output.dir is not None:
        run_dir = Path(cfg.output.dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"--resume: {run_dir} holds no run (no config.yaml); run it first without --resume"
            )
        return run_dir
    parent = Path(cfg.output.root) / cfg.name
    runs = sorted(p for p in parent.glob("*") if (p / "config.yaml").is_file()) if parent.is_dir() else []
    if not runs:
        raise ConfigError(
            f"--resume: no earlier run of {cfg.name!r} under {parent}; run it first without --resume"
        )
    mine = _comparable(cfg)
    same = []
    for p in runs:
        try:
            if _comparable(read_run_config(p)) == mine:
                same.append(p)
        except ConfigError:  # a folder of an older or damaged config: not a candidate
            continue
    if not same:
        newest = runs[-1]
        try:
            diffs = ", ".join(sorted(_diff_keys(_comparable(read_run_config(newest)), mine))[:8])
        except ConfigError:
            diffs = "(its config.yaml is not valid)"
        raise ConfigError(
            f"--resume: none of the {len(runs)} run(s) of {cfg.name!r} under {parent} has this config (the newest, "
            f"{newest.name}, differs in {diffs}); resume with the same config and overrides, pick a folder "
            "with output.dir=<folder>, or start a new run"
        )
    if console is not None and len(runs) > 1:
        console.print(
            f"resuming {same[-1]}, the newest of {len(same)} run(s) with this config "
            f"({len(runs)} under {parent}); pass output.dir=<folder> to resume another"
        )
    return same[-1]


def read_run_config(run_dir: Path) -> RunConfigBase:
    """The resolved config saved in ``run_dir/config.yaml``."""
    path = run_dir / "config.yaml"
    return validate_config(read_yaml(path), source=str(path))


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


class RunLock:
    """An exclusive lock on a run folder for the life of a run: ``<run_dir>/.lock`` holds the owner's
    PID, host and start time, and is held with ``flock`` -- the kernel releases it when the owner
    exits however it dies, so a lock left by a killed run is stale and is simply taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # held open (and locked) for the life of the run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = _read_owner(fh.read())
            fh.close()
            raise ConfigError(
                f"the run folder {self.path.parent} is in use by {owner}; wait for that run to finish (or stop "
                "it), or start a new run without --resume"
            ) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
            fh.flush()
        except BaseException:  # e.g. a full disk: do not keep a half-held lock
            fh.close()
            raise
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
            self.path.unlink(missing_ok=True)


def _read_owner(text: str) -> str:
    try:
        info = json.loads(text)
        started = datetime.fromtimestamp(float(info["started"])).strftime("%Y-%m-%d %H:%M:%S")
        return f"PID {info['pid']} on {info['host']} (started {started})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@dataclass
class RunFolder:
    """The run folder a run holds: its lock, and whether this run created it (then a run that fails
    before writing anything resumable removes it again, see :meth:`close`)."""

    path: Path
    created: bool
    lock: RunLock | None = None

    def close(self, failed: bool) -> None:
        if self.lock is not None:
            self.lock.release()
        if failed and self.created and not holds_results(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
            parent = self.path.parent
            with contextlib.suppress(OSError):  # the <name> folder, when this run was its only one
                parent.rmdir()


def holds_results(run_dir: Path) -> bool:
    """Whether a run folder holds anything a user could resume or read: a checkpoint, a finished arm,
    or a logged training record."""
    run_dir = Path(run_dir)
    if any(run_dir.rglob("result.json")) or any(p.is_dir() for p in run_dir.rglob("checkpoints/step-*")):
        return True
    return any(p.stat().st_size > 0 for p in run_dir.rglob("metrics.jsonl"))


def check_resume_processes(run_dir: Path, processes: int) -> None:
    """A resumed arm needs the random state of every process in its checkpoint: refuse resuming with
    more processes than wrote the newest checkpoint of an unfinished arm (before anything trains)."""
    for ckpt_root in sorted(Path(run_dir).rglob("checkpoints")):
        arm_dir = ckpt_root.parent
        ckpt = latest_checkpoint(arm_dir)
        if ckpt is None or (arm_dir / "result.json").is_file():
            continue
        if not (ckpt / f"rng-rank{processes - 1}.pt").is_file():
            written = len(list(ckpt.glob("rng-rank*.pt")))
            raise ConfigError(
                f"--resume with {processes} processes: the checkpoint {ckpt} was written by {written} "
                f"process(es) and holds the random state of those only; resume with {written} "
                + (
                    "process (without accelerate launch)"
                    if written == 1
                    else f"processes (accelerate launch --multi_gpu --num_processes {written} -m distillery run ...)"
                )
            )


def _run_info(acc, resume: bool, previous: Path | None) -> dict[str, Any]:
    """``run.json``: how this run was launched (processes, backend, device, versions), and for a
    resumed run the launches before it (``earlier``)."""
    from importlib.metadata import PackageNotFoundError, version

    import accelerate
    import torch

    try:
        ours = version("distillery")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "unknown"
    info: dict[str, Any] = {
        **describe_processes(acc),
        "started": datetime.now().isoformat(timespec="seconds"),
        "resumed": resume,
        "host": socket.gethostname(),
        "versions": {"distillery": ours, "torch": torch.__version__, "accelerate": accelerate.__version__},
        "earlier": [],
    }
    if previous is not None and previous.is_file():
        try:
            old = json.loads(previous.read_text())
            if isinstance(old, dict):
                earlier = old.pop("earlier", [])
                info["earlier"] = [*(earlier if isinstance(earlier, list) else []), old]
        except (OSError, ValueError):  # a damaged record of an earlier launch: start the list again
            pass
    return info


def start_run(
    cfg: RunConfigBase, resume: bool, console: Console | None, progress: bool, accelerator=None
) -> tuple[RunContext, RunFolder]:
    """What every run does first: the accelerator; the checks of the config that depend on the number
    of processes (every process raises the same error, before anything is created or trained); a
    console that only the main process prints to, and the line ``processes: N (backend ...), device
    ...`` (with a warning when ``accelerate launch`` started fewer processes than it was asked for);
    the run folder (created or found by the main process, locked, agreed by all processes) with the
    resolved config written into it, and ``run.json`` (how the run was launched, see
    :func:`_run_info`)."""
    acc = accelerator or make_accelerator(run_mixed_precision(cfg))
    check_processes(cfg, acc.num_processes)
    progress_interval()  # a bad DISTILLERY_PROGRESS_EVERY fails now, not at the first progress line
    main = acc.is_main_process
    console = console or Console(quiet=not main, emoji=False)
    if not main:
        console.quiet = True
    # the loop draws a live bar on a terminal and plain lines elsewhere (logs, CI, SLURM)
    progress = progress and main
    info = describe_processes(acc)
    console.print(process_line(info), highlight=False)
    warning = launch_warning(acc.num_processes)
    if warning is not None:
        console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False, soft_wrap=True)
    folder = None
    error: ConfigError | None = None
    if main:
        try:
            if resume:
                folder = RunFolder(find_resume_dir(cfg, console), created=False)
                check_resume_config(folder.path, cfg)
                check_resume_processes(folder.path, acc.num_processes)
            else:
                path = create_run_dir(cfg)
                folder = RunFolder(path, created=True)
            folder.lock = RunLock(folder.path)
            folder.lock.acquire()
            write_atomic(folder.path / "config.yaml", dump_config(cfg))
            record = _run_info(acc, resume, folder.path / RUN_INFO if resume else None)
            write_atomic(folder.path / RUN_INFO, json.dumps(record, indent=2))
        except ConfigError as exc:
            if folder is not None:
                folder.close(failed=True)
            error = exc
        except BaseException:  # e.g. a full disk: leave no folder behind either
            if folder is not None:
                folder.close(failed=True)
            raise
    holder = [
        None if error is not None else str(folder.path) if main else None,
        str(error) if error else None,
    ]
    if acc.num_processes > 1:
        broadcast_object_list(holder)
    if holder[1] is not None:
        raise error if error is not None else ConfigError(holder[1])
    if not main:
        folder = RunFolder(Path(holder[0]), created=False)
    acc.wait_for_everyone()
    context = RunContext(accelerator=acc, console=console, progress=progress, run_dir=folder.path)
    return context, folder
