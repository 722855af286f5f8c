"""How this run was launched: processes, distributed backend, device; and launches that went wrong.

``accelerate launch --num_processes 2 ...`` without ``--multi_gpu`` (on a machine without several
GPUs) starts *one* process: accelerate's simple launcher sets ``MASTER_ADDR``/``MASTER_PORT`` for the
processes it was asked for, but no ``WORLD_SIZE``, and runs the script once. :func:`launch_warning`
reads exactly that signal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def describe_processes(accelerator) -> dict[str, Any]:
    """``{"processes", "backend", "device", "distributed_type", "mixed_precision"}`` of ``accelerator``;
    ``backend`` is ``"none"`` for one process, else the ``torch.distributed`` backend (gloo, nccl)."""
    state = accelerator.state
    backend = getattr(state, "backend", None) if accelerator.num_processes > 1 else None
    distributed = getattr(accelerator, "distributed_type", None)
    return {
        "processes": int(accelerator.num_processes),
        "backend": str(backend) if backend else "none",
        "device": str(accelerator.device),
        "distributed_type": str(getattr(distributed, "value", distributed) or "NO"),
        "mixed_precision": str(getattr(accelerator, "mixed_precision", "no")),
    }


def process_line(info: Mapping[str, Any]) -> str:
    """One line for the start of a run: ``processes: 2 (backend gloo), device cpu``."""
    return f"processes: {info['processes']} (backend {info['backend']}), device {info['device']}"


def launch_warning(processes: int, env: Mapping[str, str] | None = None) -> str | None:
    """A warning when ``accelerate launch`` was asked for several processes but started one.

    Example:
        >>> launch_warning(1, {"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1"})[:53]
        'accelerate launch was asked for more than one process'
        >>> launch_warning(1, {"ACCELERATE_DYNAMO_BACKEND": "NO"}) is None  # --num_processes 1
        True
    """
    env = os.environ if env is None else env
    by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in env or "ACCELERATE_MIXED_PRECISION" in env
    if processes > 1 or not by_accelerate or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return None
    return (
        "accelerate launch was asked for more than one process (--num_processes > 1), but without "
        "--multi_gpu it started one: this run uses 1 process. To train on two, launch it as "
        "`accelerate launch --multi_gpu --num_processes 2 -m distillery run ...` (on a CPU too: the "
        "processes then talk over gloo)"
    )


__all__ = ["describe_processes", "launch_warning", "process_line"]
