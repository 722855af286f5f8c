"""The training loop: one explicit loop on Hugging Face Accelerate for every method.

Per optimizer step:

1. take the step's global batch from the :class:`BatchPlan`, split into ``grad_accum`` micro-batches
   and across processes;
2. count, for each loss term, its rows over the whole step (all micro-batches, all processes);
3. for each micro-batch: student forward, teacher (only if a term needs it), ``teacher.observe``, loss terms
   divided by the global counts, backward (gradient sync only on the last micro-batch);
4. stop with a message if any loss part or gradient is not finite (before the weights change);
5. clip, optimizer and scheduler step; ``teacher.update(student, step)``;
6. log, evaluate and checkpoint on their schedules (a checkpoint is written only of finite weights);
   on Ctrl-C or SIGTERM (agreed by all processes), checkpoint and stop.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.data.augment import augment_batch
from distillery.errors import ConfigError, NonFiniteLossError, RunInterrupted, TeacherUnavailableError
from distillery.fileio import is_finite_tree
from distillery.functional.paced import expand_row_weight
from distillery.losses import LossInputs, Objective
from distillery.models.adapters import ROW_WEIGHT_KEY, ClassifierAdapter
from distillery.models.placement import is_placed
from distillery.train.batches import BatchPlan
from distillery.train.checkpoint import (
    CheckpointWriter,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    step_of,
)
from distillery.train.config import TrainConfig, check_batch_split
from distillery.train.datasets import batch_source, check_batch_keys
from distillery.train.fsdp import Sharded, all_finite, shard
from distillery.train.logging import MetricLog
from distillery.train.progress import TrainProgress
from distillery.train.schedules import build_optimizer, build_scheduler


@dataclass
class FitResult:
    """What :func:`fit` returns. ``model`` is the trained (unwrapped) model."""

    model: nn.Module
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    last_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    resumed_from: int | None = None


def make_accelerator(mixed_precision: str | None = None):
    """An Accelerator for this process: the CPU (gloo for several processes) unless CUDA is present.

    ``mixed_precision`` (``no``, ``bf16``, ``fp16``; None: what ``accelerate launch`` was told, else
    ``no``) is one setting per process in Accelerate. In one process, asking for another setting than
    an earlier accelerator's starts Accelerate's state again (a script or notebook that runs an fp32
    and a bf16 run one after the other); under ``accelerate launch`` it is an error.

    Raises:
        ConfigError: fp16 without CUDA, or another setting than the launched processes'.
    """
    import os

    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if wanted == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast with loss scaling); on a CPU use "
            "bf16 or no"
        )
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != wanted:
        if PartialState().num_processes > 1:
            raise ConfigError(
                f"train.mixed_precision={wanted}, but these processes were started with mixed precision "
                f"{current}; set them equal (accelerate launch --mixed_precision {wanted})"
            )
        AcceleratorState._reset_state()  # one process: nothing else shares the state
    return Accelerator(cpu=not cuda, mixed_precision=wanted)


def _gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn Hugging Face gradient (activation) checkpointing on or off: non-reentrant, so gradients are
    exact and frozen embeddings (LoRA) need no extra hook; the KV cache is off while it is on.

    Raises:
        ConfigError: the model has no gradient checkpointing.
    """
    # the outermost Hugging Face model (a wrapper such as an image classifier holds one)
    model = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), model)
    # transformers 5 renamed it activation checkpointing; older releases have the gradient_* names only
    names = ("activation_checkpointing", "activation_checkpointing_kwargs")
    if not hasattr(model, "activation_checkpointing_enable"):
        names = ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    config = getattr(model, "config", None)
    if not on:
        if getattr(model, f"is_{names[0]}", False):
            getattr(model, f"{names[0]}_disable")()
            if config is not None and hasattr(model, "_distillery_use_cache"):
                config.use_cache = model._distillery_use_cache
        return
    enable = getattr(model, f"{names[0]}_enable", None)
    if enable is None:
        raise ConfigError(
            f"train.gradient_checkpointing=true needs a Hugging Face model (activation_checkpointing_enable); "
            f"{type(model).__name__} has none: set train.gradient_checkpointing=false"
        )
    try:
        enable(**{names[1]: {"use_reentrant": False}})
    except ValueError as exc:  # transformers: the architecture does not support it
        raise ConfigError(f"train.gradient_checkpointing=true: {exc}") from None
    if config is not None and getattr(config, "use_cache", None):
        model._distillery_use_cache = config.use_cache
        config.use_cache = False


class _StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step (a
    second Ctrl-C aborts at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _finite_grads(params: list[nn.Parameter]) -> bool:
    """Whether every gradient is finite (one device sync for all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _finite_checkpoint_note(run_dir: Path | None) -> str:
    """Where the newest checkpoint is: every checkpoint holds finite weights (they are checked before
    they are written)."""
    if run_dir is None:
        return ""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "; no checkpoint was written before it (the arm restarts from its first step)"
    return f"; the last good checkpoint (finite weights) is {ckpt} (step {step_of(ckpt)}): --resume continues from it"


def _check_fsdp(objective: Objective, teacher, batch_transform, before_step=None) -> None:
    """What a sharded run (``train.parallel: fsdp``) cannot do, refused before anything trains.

    Raises:
        ConfigError: loss terms with their own parameters, a teacher that reads the student's weights, or
            a batch transform (sampling from the student: each process would decode a different number
            of tokens, and a sharded forward needs all of them).
    """
    own = [name for name, term in objective.terms.items() if any(True for _ in term.parameters())]
    if own:
        raise ConfigError(
            f"train.parallel=fsdp: the loss term(s) {', '.join(own)} have their own parameters (projectors), "
            "which the sharded loop does not shard; use train.parallel=ddp for them"
        )
    if teacher is not None and getattr(teacher, "fsdp", "no") == "no":
        raise ConfigError(
            f"train.parallel=fsdp: the teacher ({type(teacher).__name__}) reads or copies the student's weights, "
            "which no process holds whole under FSDP; use train.parallel=ddp with it (frozen, cached and server "
            "teachers work with fsdp)"
        )
    if batch_transform is not None:
        raise ConfigError(
            "train.parallel=fsdp: this arm samples from the student during training (on-policy or sequence "
            "generation), which the sharded loop does not support yet; use train.parallel=ddp for it"
        )
    if before_step is not None:
        raise ConfigError(
            "train.parallel=fsdp: this arm changes the student on a schedule before its steps (pruning masks), "
            "which needs the whole weights; use train.parallel=ddp for it"
        )


def _to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _rows(batch: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Rows ``start:stop`` of every per-example value (tensors, and lists such as a column of strings)."""
    return {k: v[start:stop] if isinstance(v, (Tensor, list, tuple)) else v for k, v in batch.items()}


def _row_weight(batch: dict[str, Tensor], mask: Tensor, adapter) -> Tensor | None:
    """The batch's optional per-example ``row_weight`` ``[B]`` (or full row shape), broadcast to the
    adapter's rows: over trailing dims by default (``[B]`` -> ``[B, T-1]`` tokens), or by the adapter's
    own ``row_weight(weight)`` where the batch axis is not the first (stacked exits / peers ``[M, B]``)."""
    weight = batch.get(ROW_WEIGHT_KEY)
    if weight is None:
        return None
    if hasattr(adapter, "row_weight"):
        weight = adapter.row_weight(weight)
    return expand_row_weight(weight, mask.shape)


def fit(
    model: nn.Module,
    train_set,
    objective: Objective,
    config: TrainConfig,
    *,
    teacher=None,
    adapter=None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    accelerator=None,
    progress: bool = True,
    label: str = "train",
    on_step: Callable[[int], None] | None = None,
    tensorboard: bool | None = None,
    trackers=None,
    batch_transform: Callable[[dict[str, Tensor], nn.Module, int], dict[str, Tensor]] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    before_step: Callable[[nn.Module, int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` to minimise ``objective``.

    Args:
        model: the student (any ``nn.Module``), already initialised.
        train_set: one of (see :mod:`distillery.train.datasets`): an object with ``__len__`` and
            ``get_batch(indices) -> dict of tensors`` (distillery's datasets); a map-style
            ``torch.utils.data.Dataset`` (items: dicts of tensors or numbers, or ``(x, y)`` pairs, which
            become the batch keys ``x`` and ``y``); a Hugging Face ``datasets.Dataset``. Batches are drawn
            by position from a seeded plan, whichever it is: equal seeds give equal runs, and resumption
            is exact. Anything else is a :class:`~distillery.train.datasets.TrainSetError` (a
            ``ConfigError`` and a ``TypeError``) naming the protocols.
        objective: the weighted loss terms (:class:`distillery.losses.Objective`).
        config: length, batch size, accumulation, optimiser, schedule, logging cadence.
        teacher: a :class:`distillery.teachers.Teacher`, required when a term needs one.
        adapter: how to call models on a batch (default :class:`ClassifierAdapter`).
        seed: seeds the batch order, augmentations and dropout: equal seeds give equal runs on CPU.
        run_dir: where metrics, checkpoints and TensorBoard logs go (None: keep nothing on disk).
        evaluate: ``evaluate(model) -> metrics``, run on the main process on the eval schedule.
        batch_transform: ``batch_transform(batch, student, step) -> batch`` applied to every micro-batch
            before the loss rows are counted (on-policy and speculative distillation replace responses
            with sampled ones here); it must be deterministic given ``step`` for exact resumption. A
            ``"row_weight"`` key ``[B]`` in the batch (PACED) scales each example's loss rows; models
            never see it (adapters read only their own keys).
        resume: continue from the newest intact checkpoint in ``run_dir`` if there is one (damaged
            ones are skipped with a printed note; all damaged is a ``DamagedCheckpointError``).
        accelerator: an ``accelerate.Accelerator`` (default: one for this process).
        progress: show a progress bar (main process only).
        label: name shown on the progress bar.
        on_step: called with the step number after every completed step (tests, custom hooks).
        tensorboard: also write TensorBoard logs to ``run_dir/tensorboard`` (None: when installed).
        trackers: where the records also go (``distillery.train.trackers.ScopedTrackers``: MLflow,
            W&B, ... through Accelerate), main process only.
        before_step: ``before_step(student, step)`` at the start of every step (0-based), before its
            batches are drawn: a change of the student that follows a schedule (a pruning mask). It
            must depend on the weights and ``step`` only, so that a resumed run repeats it exactly.
        collate_fn: for a map-style dataset, ``collate_fn(items) -> batch`` (default
            ``torch.utils.data.default_collate``); for a ``datasets.Dataset``, ``collate_fn(rows)`` on the
            batch's rows as dicts (e.g. ``transformers.DataCollatorWithPadding(tokenizer)``).

    The batch keys are checked against the adapter's (and the teacher's adapter's) at the first
    batch: a Hugging Face model trained with the default :class:`ClassifierAdapter` (keys ``x``,
    ``y``) is an error that names the adapter to use, not a ``KeyError``.
    """
    acc = accelerator or make_accelerator(config.mixed_precision)
    if config.mixed_precision is not None and config.mixed_precision != acc.mixed_precision:
        raise ConfigError(
            f"train.mixed_precision={config.mixed_precision}, but the run's accelerator uses "
            f"{acc.mixed_precision} (one setting per process in Accelerate): give every train section the same "
            "mixed_precision, or leave it null (the run's)"
        )
    adapter = adapter or ClassifierAdapter()
    run_dir = None if run_dir is None else Path(run_dir)
    train_set = batch_source(train_set, collate_fn)
    if objective.needs_teacher and teacher is None:
        raise ConfigError(
            f"the loss terms {[n for n, t in objective.terms.items() if t.needs_teacher]} need a teacher"
        )
    world, rank = acc.num_processes, acc.process_index
    check_batch_split(config, world)
    micro = config.batch_size // config.grad_accum  # global micro-batch
    per_rank = micro // world
    total_steps = config.total_steps(len(train_set))
    plan = BatchPlan(len(train_set), config.batch_size, seed)
    eval_every = config.eval_every if config.eval_every is not None else max(1, total_steps // 10)

    if config.parallel == "fsdp" and world == 1:
        acc.print(
            f"  warning: {label}: train.parallel=fsdp with one process shards nothing; it trains as one process "
            "(launch several: accelerate launch --multi_gpu --num_processes N -m distillery run ...)"
        )
    fsdp = config.parallel == "fsdp" and world > 1
    if fsdp:
        _check_fsdp(objective, teacher, batch_transform, before_step)

    torch.manual_seed(seed)
    objective = objective.to(acc.device)
    _gradient_checkpointing(model, config.gradient_checkpointing)
    student_shards: Sharded | None = None
    teacher_shards: Sharded | None = None
    if fsdp:  # shard first: the optimizer must see the sharded parameters
        model.to(acc.device)
        student_shards = shard(model, mixed_precision=acc.mixed_precision)
        if (
            teacher is not None
            and getattr(teacher, "fsdp", "no") == "shard"
            and not is_placed(teacher.module)
        ):
            teacher.module.to(acc.device)
            teacher_shards = shard(teacher.module, frozen=True)
    optimizer = build_optimizer(list(model.parameters()) + list(objective.parameters()), config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, total_steps)
    if not fsdp:
        model, optimizer = acc.prepare(model, optimizer)
    raw_model = acc.unwrap_model(model)
    if teacher is not None and hasattr(teacher, "to"):
        teacher.to(acc.device)

    log = MetricLog(
        run_dir if acc.is_main_process else None,
        tensorboard=tensorboard,
        trackers=trackers if acc.is_main_process else None,
    )
    writer = (
        CheckpointWriter(run_dir, acc, config.keep_checkpoints, sharded=fsdp) if run_dir is not None else None
    )
    start = 0
    resumed_from = None
    history: list[dict[str, Any]] = []
    if resume and run_dir is not None:
        # the newest checkpoint that matches its checksums; say which damaged ones were skipped
        ckpt, notes = find_resumable(run_dir)
        for note in notes:
            acc.print(f"  {label}: {note}")
        if ckpt is not None:
            state = load_checkpoint(ckpt, raw_model, optimizer, scheduler, rank, sharded=fsdp)
            start = resumed_from = int(state["step"])
            if start > total_steps:
                raise ConfigError(
                    f"checkpoint {ckpt} is at step {start}, beyond this run's {total_steps} steps"
                )
            if teacher is not None:
                teacher.load_state_dict(state.get("teacher", {}))
            objective.load_state_dict(state.get("objective", {}))
            history = list(state.get("history", []))
            acc.print(f"  {label}: resumed from step {start} of {total_steps} ({ckpt.name})")

    if resume and run_dir is not None:
        # Resumed from a checkpoint: the records after it go. No checkpoint: the arm restarts from
        # its first step, and so does its log (never a second history appended to the first).
        torn = log.truncate(start)
        if torn:
            acc.print(f"  {label}: dropped {torn} incomplete line(s) of {log.path} (a write cut short)")

    def extra_state() -> dict[str, Any]:
        return {
            "teacher": teacher.state_dict() if teacher is not None else {},
            "objective": objective.state_dict(),
            "history": history,
        }

    def save_finite(step: int) -> Path:
        """Checkpoint, unless the weights are not finite: a checkpoint always holds good weights."""
        finite = (
            all_finite(raw_model.parameters()) if fsdp else is_finite_tree(raw_model.state_dict().values())
        )
        if not finite:
            raise NonFiniteLossError(
                f"step {step} made the model's weights non-finite (NaN or infinite) although its loss "
                f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}) and gradients were finite; "
                "they were not checkpointed"
                + _finite_checkpoint_note(run_dir)
                + ". Try a lower learning rate or gradient clipping (train.clip_grad_norm)."
            )
        return writer.save(step, raw_model, optimizer, scheduler, extra_state())

    def run_eval(step: int) -> None:
        # sharded: the forward is collective, so every process evaluates (the same rows, the same numbers)
        if evaluate is None or not (acc.is_main_process or fsdp):
            return
        record = {"step": step, "epoch": plan.epoch_of(step), **evaluate(raw_model)}
        history.append(record)
        log.log(step, "eval", {k: v for k, v in record.items() if k != "step"})

    def step_batches(at: int) -> list[dict[str, Tensor]]:
        """This process's micro-batches of step ``at`` (a pure function of ``seed`` and ``at``)."""
        indices = plan.indices(at).view(config.grad_accum, micro)
        if config.augment.is_identity():
            return [
                _to_device(train_set.get_batch(ix[rank * per_rank : (rank + 1) * per_rank]), acc.device)
                for ix in indices
            ]
        batches = []  # augment the global micro-batch identically on every process, then take our rows
        for a, ix in enumerate(indices):
            g = torch.Generator().manual_seed(((seed * 1_000_003 + at) * 131 + a) % (2**63))
            full = augment_batch(train_set.get_batch(ix), config.augment, g)
            batches.append(_to_device(_rows(full, rank * per_rank, (rank + 1) * per_rank), acc.device))
        return batches

    # A teacher with prefetch (a server) is sent each step's rows before the student's forward, and the
    # next step's as well where they do not depend on the student (no batch transform): its answers
    # arrive while the student trains.
    prefetch = getattr(teacher, "prefetch", None) if objective.needs_teacher else None
    upcoming: dict[int, list[dict[str, Tensor]]] = {}

    bar = TrainProgress(label, total_steps, start, enabled=progress and acc.is_main_process)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    step = start
    model.train()
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                epoch = plan.epoch_of(step)
                if before_step is not None:  # e.g. a pruning schedule: a function of the weights and step
                    before_step(raw_model, step)
                batches = upcoming.pop(step, None) or step_batches(step)
                if batch_transform is not None:  # e.g. on-policy: responses sampled from the student
                    batches = [batch_transform(b, raw_model, step) for b in batches]
                if prefetch is not None:  # a remote teacher: this step's rows now, the next step's too
                    prefetch(batches)
                    if batch_transform is None and step + 1 < total_steps:
                        upcoming[step + 1] = step_batches(step + 1)
                        prefetch(upcoming[step + 1])
                if step == start:  # once: the batch keys against what the adapters read
                    check_batch_keys(batches[0], adapter, raw_model)
                    t_adapter = getattr(teacher, "adapter", None)
                    if objective.needs_teacher and t_adapter is not None:
                        t_model = getattr(teacher, "module", None)
                        check_batch_keys(batches[0], t_adapter, t_model, "teacher's adapter")

                # Rows per term over the whole step, all processes: the normaliser of every term.
                counts = sum(objective.counts(*adapter.rows(b)) for b in batches)
                counts = acc.reduce(counts, "sum") if world > 1 else counts
                parts_sum = torch.zeros(len(objective.names), dtype=torch.float64, device=acc.device)
                for a, batch in enumerate(batches):
                    sync = a == len(batches) - 1
                    if fsdp:  # reduce-scatter the gradients on the last micro-batch only
                        model.set_requires_gradient_sync(sync)
                    with nullcontext() if sync or fsdp else acc.no_sync(model):
                        s_out = adapter.forward(model, batch)
                        try:
                            t_out = teacher(batch, s_out) if objective.needs_teacher else None
                        except TeacherUnavailableError as exc:
                            raise type(exc)(
                                f"{exc}; step {step + 1} changed no weight" + _finite_checkpoint_note(run_dir)
                            ) from None
                        if teacher is not None:
                            teacher.observe(batch, s_out)
                        target, mask = adapter.rows(batch)
                        inputs = LossInputs(
                            student_logits=s_out.logits,
                            target=target,
                            mask=mask,
                            teacher_logits=None if t_out is None else t_out.logits,
                            student_features=s_out.features,
                            teacher_features={} if t_out is None else t_out.features,
                            epoch=epoch,
                            # per-example weights [B] (PACED), repeated over token rows [B, T-1]
                            row_weight=_row_weight(batch, mask, adapter),
                        )
                        parts = objective(inputs, counts)
                        # DDP averages gradients over processes; the terms are already global means.
                        acc.backward(objective.total(parts, epoch) * world)
                    parts_sum += torch.stack([p.detach().to(torch.float64) for p in parts.values()])
                parts_sum = acc.reduce(parts_sum, "sum") if world > 1 else parts_sum
                values = dict(zip(objective.names, parts_sum.tolist()))
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} in part(s) {', '.join(bad)} "
                        f"({', '.join(f'{k}={values[k]}' for k in bad)}); this step changed no weight"
                        + _finite_checkpoint_note(run_dir)
                        + ". Try a lower learning rate or gradient clipping (train.clip_grad_norm)."
                    )
                params = [p for group in optimizer.param_groups for p in group["params"]]
                if not (all_finite(p.grad for p in params) if fsdp else _finite_grads(params)):
                    raise NonFiniteLossError(
                        f"non-finite gradients at step {step + 1} (the loss parts were finite: "
                        f"{', '.join(f'{k}={v:.4g}' for k, v in values.items())}); this step changed no weight"
                        + _finite_checkpoint_note(run_dir)
                        + ". Try a lower learning rate, gradient clipping (train.clip_grad_norm) or fp32."
                    )
                if config.clip_grad_norm is not None and fsdp:  # the norm over all shards
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                elif config.clip_grad_norm is not None:
                    acc.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if teacher is not None:
                    teacher.update(raw_model, step)

                total = sum(objective.weight_at(k, epoch) * v for k, v in values.items())
                last = {"loss": total, **values}
                if step % config.log_every == 0 or step == total_steps:
                    log.log(step, "train", {"epoch": epoch, "lr": lr, **last})
                    if hasattr(teacher, "metrics"):  # e.g. a multi-teacher's weight per member
                        log.log(step, "teacher", teacher.metrics())
                bar.update(step, config.batch_size, last)
                if step == total_steps or (eval_every and step % eval_every == 0):
                    run_eval(step)
                    model.train()
                if writer is not None and (
                    step == total_steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
                ):
                    save_finite(step)
                if on_step is not None:
                    on_step(step)
                requested = stop.requested
                if world > 1:  # every process stops after the same step, whichever got the signal
                    flag = torch.tensor([float(requested)], device=acc.device)
                    requested = bool(acc.reduce(flag, "sum").item() > 0)
                if requested and step < total_steps:
                    where = ""
                    if writer is not None:
                        path = save_finite(step)
                        where = f"; checkpoint written to {path}"
                    what = "stopped by SIGTERM" if stop.signum == signal.SIGTERM else "interrupted"
                    error = RunInterrupted(f"{what} after step {step} of {total_steps}{where}")
                    if stop.signum == signal.SIGTERM:
                        error.exit_code = 143
                    raise error
        if student_shards is not None:  # the trained student, and the teacher, whole on every process again
            raw_model = student_shards.consolidate()
        if teacher_shards is not None:
            teacher.module = teacher_shards.consolidate()
    finally:
        bar.close()
        log.close()
        if config.gradient_checkpointing:  # the model leaves as it came
            _gradient_checkpointing(raw_model, False)
    seconds = time.perf_counter() - t0
    done = step - start
    if acc.num_processes > 1:  # evaluation ran on the main process: give every rank its records
        from accelerate.utils import broadcast_object_list

        holder = [history]
        broadcast_object_list(holder)
        history = holder[0]
    return FitResult(
        model=raw_model,
        steps=step,
        history=history,
        last_losses=last,
        seconds=seconds,
        samples_per_second=done * config.batch_size / max(seconds, 1e-9),
        resumed_from=resumed_from,
    )


__all__ = ["FitResult", "fit", "latest_checkpoint", "make_accelerator", "step_of"]
