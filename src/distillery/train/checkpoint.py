"""Checkpoints: safetensors weights plus optimizer/scheduler/RNG state, checksummed and written
atomically.

Layout: ``<run_dir>/checkpoints/step-00000123/`` holding ``model.safetensors``, ``optimizer.pt``,
``trainer.pt`` (step, scheduler, teacher and objective state), ``rng-rank<r>.pt`` (one per process)
and ``MANIFEST.json`` (the sha256 and size of every other file, written last). A checkpoint is
assembled in a temporary folder ``.step-00000123.tmp``, flushed to disk and renamed into place, so a
crash, a power loss or Ctrl-C never leaves a half-written one under a ``step-`` name.

On resume, :func:`find_resumable` checks the checkpoints newest first against their manifests and
takes the newest intact one, saying which damaged ones it skipped. A ``step-`` folder without a
manifest was written by a distillery older than the manifests: it is taken as it is, with a note that
it is unverified. Everything is loaded with ``torch.load(weights_only=True)``, which cannot execute
code; a file that does not decode is a :class:`DamagedCheckpointError` naming it.

A sharded run (``train.parallel: fsdp``) writes ``sharded/`` instead of ``model.safetensors`` and
``optimizer.pt``: the model's and optimizer's shards through ``torch.distributed.checkpoint``, one
file per process plus its ``.metadata``, inside the same temporary folder and under the same manifest,
so that a damaged shard makes the whole checkpoint damaged and the previous one is used.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distillery.errors import ConfigError, DistilleryError
from distillery.fileio import (
    MANIFEST,
    DamagedFileError,
    disk_errors,
    fsync_tree,
    replace_durable,
    verify_manifest,
    write_manifest,
)

PREFIX = "step-"

T = TypeVar("T")


class DamagedCheckpointError(DistilleryError):
    """No checkpoint of a run can be resumed from, or one of its files does not decode."""


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))  # noqa: NPY002 (user code may use the global RNG)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The finished checkpoint folders of a run, oldest first (temporary ``.step-*`` folders excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, unverified (see :func:`find_resumable` for the checked one)."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def find_resumable(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` whose files match its manifest, and a message for each
    damaged one skipped on the way (or for an unverified one written before manifests existed).

    Returns ``(None, [])`` when the run has no checkpoint. Raises :class:`DamagedCheckpointError`,
    naming every damaged file, when there are checkpoints but none is intact.
    """
    damaged: list[tuple[Path, DamagedFileError]] = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        if not (ckpt / MANIFEST).is_file():  # written by a distillery older than the manifests
            notes = _skipped(damaged, ckpt)
            notes.append(
                f"checkpoint {ckpt.name} has no {MANIFEST} (written by an older distillery): "
                "resuming from it unverified"
            )
            return ckpt, notes
        try:
            verify_manifest(ckpt)
        except DamagedFileError as exc:
            damaged.append((ckpt, exc))
            continue
        return ckpt, _skipped(damaged, ckpt)
    if damaged:
        root = Path(run_dir) / "checkpoints"
        found = "; ".join(f"{ckpt.name}: {exc}" for ckpt, exc in damaged)
        raise DamagedCheckpointError(
            f"every checkpoint in {root} is damaged ({found}). Delete {root} to train this arm again "
            "from the start, or delete the run folder and run again without --resume"
        )
    return None, []


def _skipped(damaged: list[tuple[Path, DamagedFileError]], used: Path) -> list[str]:
    return [
        f"checkpoint {ckpt.name} is damaged: {exc}; resuming from {used.name} instead"
        for ckpt, exc in damaged
    ]


class CheckpointWriter:
    """Writes checkpoints of one run; every process calls :meth:`save` (each stores its own RNG)."""

    def __init__(self, run_dir: Path, accelerator, keep: int = 1, *, sharded: bool = False) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.acc = accelerator
        self.keep = keep
        self.sharded = sharded

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        extra: dict[str, Any],
    ) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".{PREFIX}{step:08d}.tmp"
        main = self.acc.is_main_process
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        with disk_errors(tmp):  # a full disk is reported as one, whatever torch or safetensors raise
            torch.save(rng_state(), tmp / f"rng-rank{self.acc.process_index}.pt")
            if self.sharded:  # collective: every process writes its shard
                from distillery.train.fsdp import save_sharded

                save_sharded(tmp, model, optimizer)
            elif main:
                save_file(_every_key(model), str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if main:
                torch.save({"step": step, "scheduler": scheduler.state_dict(), **extra}, tmp / "trainer.pt")
        self.acc.wait_for_everyone()  # every process's RNG file is in tmp before the manifest lists them
        if main:
            write_manifest(tmp)
            fsync_tree(tmp)
            # The same step again (Ctrl-C just after a scheduled checkpoint, or a damaged one being
            # rewritten after a resume skipped it): move the old folder aside rather than delete it first.
            old = self.root / f".{PREFIX}{step:08d}.old"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            replace_durable(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            # Keep the newest `keep` up to this step; newer ones are damaged ones a resume skipped, left
            # for the user to inspect until this run writes over them.
            done = [d for d in checkpoint_dirs(self.root.parent) if step_of(d) <= step]
            for stale in done[: -self.keep]:
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final


def _read(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``, with a file that is missing or does not decode turned into a user error."""
    try:
        return read(path)
    except Exception as exc:  # garbage makes the decoders raise almost anything
        problem = (
            "missing"
            if isinstance(exc, FileNotFoundError)
            else f"cannot be read ({type(exc).__name__}: {exc})"
        )
        raise DamagedCheckpointError(
            f"checkpoint file {path} is {problem}; delete {path.parent} to resume from the checkpoint "
            f"before it, or {path.parent.parent} to train this arm again from the start"
        ) from exc


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    process_index: int = 0,
    *,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from ``path``; return the trainer state (step, extras)."""
    path = Path(path)
    rng_file = path / f"rng-rank{process_index}.pt"
    if not rng_file.is_file():
        raise ConfigError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than are resuming it"
        )
    if sharded:
        from distillery.train.fsdp import SHARDED_DIR, load_sharded

        if not (path / SHARDED_DIR).is_dir():
            raise ConfigError(
                f"{path} holds no {SHARDED_DIR}/ folder: it was written by a run without train.parallel=fsdp; "
                "resume it with the parallel setting it was written with"
            )
        _read(path / SHARDED_DIR, lambda p: load_sharded(path, model, optimizer))
    else:
        if not (path / "model.safetensors").is_file() and (path / "sharded").is_dir():
            raise ConfigError(
                f"{path} is a sharded checkpoint (train.parallel=fsdp): resume it with train.parallel=fsdp and "
                "the same number of processes"
            )
        _read(path / "model.safetensors", lambda p: _load_every_key(model, p))
        optimizer.load_state_dict(_read(path / "optimizer.pt", _load_plain))
    trainer = _read(path / "trainer.pt", _load_plain)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(_read(rng_file, _load_plain))
    return trainer


def _every_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under every one of its names, a tensor that several names share (tied weights,
    an observer shared by two points of a quantized graph) copied for each further name: safetensors
    stores no shared tensors, and dropping names (as ``safetensors.torch.save_model`` does, keeping the one
    it prefers) can pick names that a freshly built model prefers differently."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach()
        ptr = (
            (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if value.numel()
            else None
        )
        state[key] = value.clone() if ptr in seen else value.contiguous()
        if ptr is not None:
            seen.add(ptr)
    return state


def _load_every_key(model: nn.Module, path: Path) -> None:
    """Load what :func:`_every_key` wrote. A name missing from the file is accepted only when it shares
    its tensor with a name that was loaded (a checkpoint of an older distillery, written with
    ``save_model``, keeps one name of tied weights)."""
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected key(s) {sorted(unexpected)[:5]} for {type(model).__name__}")
    if missing:
        current = model.state_dict()
        loaded = {current[k].untyped_storage().data_ptr() for k in state if k in current}
        lost = [k for k in missing if current[k].untyped_storage().data_ptr() not in loaded]
        if lost:
            raise RuntimeError(f"missing key(s) {sorted(lost)[:5]} for {type(model).__name__}")


def _load_plain(path: Path) -> Any:
    return torch.load(path, weights_only=True)
