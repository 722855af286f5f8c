"""``compress:`` in a classification run: every student arm trained int8-quantization-aware or pruned.

:func:`compress_job` turns an arm's job (the plain student, built and initialised as usual) into the job
of its compressed form; the loop is unchanged (pruning masks follow their schedule through
``fit(before_step=...)``). What each method saves and reports:

* ``qat``: the test split is evaluated on the real int8 model (``convert_fx``), on the CPU;
  ``student.safetensors`` holds the float weights trained under fake quantization (the plain
  architecture: ``distillery eval`` and resume load it), ``student-int8.pt`` the int8 model's state;
  the record gives both sizes on disk and the CPU latency (one thread, 256 test images) of both.
* ``prune``: ``student.safetensors`` holds the pruned weights (zeros where pruned); the record gives
  the measured sparsity, the dense size, the size with the pruned weights in CSR form, and the CPU
  latency (dense kernels: unstructured sparsity does not make them faster).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.eval import classification_metrics, predict_logits
from distillery.fileio import replace_durable
from distillery.models.compression import (
    PruneConfig,
    PruningSchedule,
    QATConfig,
    convert_int8,
    float_weights,
    latency_ms,
    observers_frozen,
    prepare_pruning,
    prepare_qat,
    saved_bytes,
    sparse_bytes,
    sparsity,
)
from distillery.tasks.base import ArmJob

LATENCY_BATCH = 256
INT8_FILE = "student-int8.pt"


def compress_job(
    job: ArmJob, cfg: QATConfig | PruneConfig, rows, teacher_logits, ece_bins: int, batch: int
) -> ArmJob:
    """The compressed form of ``job`` (its model replaced, its export, test, record and files extended).

    Args:
        job: the plain arm (``job.model`` initialised, not yet trained).
        cfg: the run's ``compress`` section.
        rows: the test split (``x``, ``y``).
        teacher_logits: ``() -> Tensor | None``, the teacher's test logits (for agreement), or None.
        ece_bins, batch: evaluation settings.
    """
    template = copy.deepcopy(job.model).cpu()  # the plain architecture, for the exported float student
    x_latency = rows.x[:LATENCY_BATCH].cpu()

    def plain(model: nn.Module) -> nn.Module:
        return float_weights(model, copy.deepcopy(template)).to(next(model.parameters()).device)

    if isinstance(cfg, QATConfig):
        example = job.train_set.get_batch(torch.arange(min(2, len(job.train_set))))["x"]
        job.model = prepare_qat(job.model, cfg, example)
        converted: dict[int, nn.Module] = {}
        validate = job.evaluate
        if validate is not None:  # the validation rows must not move the quantization ranges

            def evaluate(model: nn.Module) -> dict[str, float]:
                with observers_frozen(model):
                    return validate(model)

            job.evaluate = evaluate

        def int8(model: nn.Module) -> nn.Module:
            if id(model) not in converted:
                converted.clear()
                converted[id(model)] = convert_int8(model, cfg.backend)
            return converted[id(model)]

        def test(model: nn.Module) -> dict[str, float]:
            logits = predict_logits(int8(model), rows, job.adapter, batch, torch.device("cpu"))
            t = teacher_logits()
            return classification_metrics(logits, rows.y.cpu(), None if t is None else t.cpu(), ece_bins)

        def record(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
            q, f = int8(model), plain(model).cpu()
            return {
                "compression": {
                    "method": "qat",
                    "backend": cfg.backend,
                    "per_channel": cfg.per_channel,
                    "float_bytes": saved_bytes(f.state_dict()),
                    "int8_bytes": saved_bytes(q.state_dict()),
                    "float_latency_ms": latency_ms(f, x_latency),
                    "int8_latency_ms": latency_ms(q, x_latency),
                }
            }

        def save_extra(model: nn.Module, arm_dir: Path) -> None:
            tmp = arm_dir / f".{INT8_FILE}.tmp"
            torch.save(int8(model).state_dict(), tmp)
            replace_durable(tmp, arm_dir / INT8_FILE)

        job.test, job.record, job.save_extra = test, record, save_extra
    else:
        job.model = prepare_pruning(job.model)
        job.before_step = PruningSchedule(cfg, job.train.total_steps(len(job.train_set)))

        def record(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
            f = plain(model).cpu()
            return {
                "compression": {
                    "method": "prune",
                    "target_sparsity": cfg.sparsity,
                    "sparsity": sparsity(f),
                    "dense_bytes": saved_bytes(f.state_dict()),
                    "sparse_bytes": sparse_bytes(f),
                    "latency_ms": latency_ms(f, x_latency),
                }
            }

        job.record = record
    job.export = plain
    return job


def compression_line(record: dict[str, Any]) -> str | None:
    """One line for the console about an arm's compressed student, or None."""
    c = record.get("compression")
    if not c:
        return None
    if c["method"] == "qat":
        return (
            f"    int8 ({c['backend']}): {c['int8_bytes'] / 1024:.0f} KiB vs {c['float_bytes'] / 1024:.0f} KiB float, "
            f"{c['int8_latency_ms']:.1f} ms vs {c['float_latency_ms']:.1f} ms per {LATENCY_BATCH} images (1 thread)"
        )
    return (
        f"    pruned: sparsity {100 * c['sparsity']:.1f}%, {c['sparse_bytes'] / 1024:.0f} KiB sparse vs "
        f"{c['dense_bytes'] / 1024:.0f} KiB dense, {c['latency_ms']:.1f} ms per {LATENCY_BATCH} images (1 thread)"
    )


__all__ = ["INT8_FILE", "compress_job", "compression_line"]
