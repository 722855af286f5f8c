"""Checkpoints: safetensors weights plus optimizer/scheduler/RNG state, written atomically.

Layout: ``<run_dir>/checkpoints/step-00000123/`` holding ``model.safetensors``, ``optimizer.pt``,
``trainer.pt`` (step, scheduler, teacher and objective state) and ``rng-rank<r>.pt``. A checkpoint is
assembled in a temporary directory and renamed into place, so a crash or Ctrl-C never leaves a
half-written one; everything is loaded with ``torch.load(weights_only=True)``, which cannot execute
code.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

PREFIX = "step-"


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
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


class CheckpointWriter:
    """Writes checkpoints of one run; every process calls :meth:`save` (each stores its own RNG)."""

    def __init__(self, run_dir: Path, accelerator, keep: int = 1) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.acc = accelerator
        self.keep = keep

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
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-rank{self.acc.process_index}.pt")
        if self.acc.is_main_process:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"step": step, "scheduler": scheduler.state_dict(), **extra}, tmp / "trainer.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.root.parent)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, process_index: int = 0
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from ``path``; return the trainer state (step, extras)."""
    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / f"rng-rank{process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than are resuming it"
        )
    set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer
