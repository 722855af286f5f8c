"""Configuration of one training run of one model: length, batching, optimiser, LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from distillery.configbase import StrictModel
from distillery.data.augment import AugmentConfig
from distillery.errors import ConfigError


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0.0, description="SGD momentum")
    nesterov: bool = False


class ScheduleConfig(StrictModel):
    """Learning-rate multiplier per step: optional linear warm-up, then a decay shape."""

    name: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warm-up as a fraction of all steps")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final LR as a fraction of the peak")
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="'step' schedule: fractions of training where LR drops",
    )
    gamma: float = Field(0.1, gt=0.0, description="'step' schedule: LR factor at each milestone")

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                "conflicting fields: warmup_steps and warmup_ratio are both set; give one of them"
            )
        return self


class TrainConfig(StrictModel):
    """How one model is trained. ``batch_size`` is the global batch per optimizer step: it is split into
    ``grad_accum`` micro-batches and across data-parallel processes, and the result does not depend on
    either."""

    steps: int | None = Field(None, ge=1, description="optimizer steps (give this or epochs)")
    epochs: float | None = Field(
        None, gt=0.0, description="passes over the training set (give this or steps)"
    )
    batch_size: int = Field(64, ge=1, description="examples per optimizer step, over all processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip_grad_norm: float | None = Field(None, gt=0.0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    log_every: int = Field(10, ge=1, description="steps between logged training losses")
    eval_every: int | None = Field(
        None, ge=0, description="steps between evaluations (null: 10 evenly spaced; 0: only at the end)"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between checkpoints (null: only at the end and on Ctrl-C)"
    )
    keep_checkpoints: int = Field(1, ge=1, description="how many recent checkpoints to keep")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="autocast the model's forward through Accelerate (bf16; fp16 with loss scaling, CUDA only); "
        "one setting per process: null takes the run's (its train.mixed_precision); the losses stay float32",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how several processes share the work: ddp, each holds the whole student (and teacher) and "
        "gradients are averaged; fsdp, the student's parameters, gradients and optimizer state and a frozen "
        "teacher's parameters are sharded over the processes (PyTorch fully_shard; one process: no effect)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass instead of keeping them (Hugging Face models): "
        "less memory, about a third more compute per step",
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml_no(cls, data: Any) -> Any:
        # YAML reads a bare `no` as false: mixed_precision: no means "no"
        if isinstance(data, dict) and data.get("mixed_precision") is False:
            data = {**data, "mixed_precision": "no"}
        return data

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("conflicting fields: steps and epochs are both set; give one of them")
        if self.steps is None and self.epochs is None:
            raise ValueError("training length missing: set steps or epochs")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"conflicting fields: batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        return self

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


def check_batch_split(config: TrainConfig, processes: int, field: str = "train") -> None:
    """Refuse a global batch that does not split into ``grad_accum`` micro-batches on every process.

    Example:
        >>> check_batch_split(TrainConfig(steps=1, batch_size=12, grad_accum=4), 2)
        Traceback (most recent call last):
        ...
        distillery.errors.ConfigError: train.batch_size=12 must be divisible by train.grad_accum=4 x 2 processes = 8 (each process takes batch_size / (grad_accum x processes) examples per micro-batch); e.g. train.batch_size=16, or fewer processes

    Raises:
        ConfigError: naming ``field`` and a batch size that would split.
    """
    parts = config.grad_accum * processes
    if config.batch_size % parts:
        fit = math.ceil(config.batch_size / parts) * parts
        raise ConfigError(
            f"{field}.batch_size={config.batch_size} must be divisible by {field}.grad_accum={config.grad_accum} "
            f"x {processes} processes = {parts} (each process takes batch_size / (grad_accum x processes) "
            f"examples per micro-batch); e.g. {field}.batch_size={fit}, or fewer processes"
        )


def train_configs(config: Any, prefix: str = "") -> Iterator[tuple[str, TrainConfig]]:
    """Every :class:`TrainConfig` inside a run config (``train``, ``baseline.train``, ``teacher.train``,
    ...), with its dotted field name."""
    if isinstance(config, TrainConfig):
        yield prefix, config
    elif isinstance(config, BaseModel):
        for name in type(config).model_fields:
            yield from train_configs(getattr(config, name), f"{prefix}.{name}" if prefix else name)
    elif isinstance(config, dict):
        for key, value in config.items():
            yield from train_configs(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            yield from train_configs(value, f"{prefix}[{i}]")


def run_mixed_precision(config: Any) -> str | None:
    """The mixed precision of a run (its ``train.mixed_precision``; None: the launcher's or ``no``), checked
    against every other train section, since Accelerate has one setting per process.

    Raises:
        ConfigError: a train section (``teacher.train``, ``baseline.train``, ...) asks for another one.
    """
    main = getattr(config, "train", None)
    wanted = main.mixed_precision if isinstance(main, TrainConfig) else None
    for field, train in train_configs(config):
        if train.mixed_precision is not None and wanted is not None and train.mixed_precision != wanted:
            raise ConfigError(
                f"{field}.mixed_precision={train.mixed_precision}, but train.mixed_precision={wanted}: mixed "
                f"precision is one setting per process (Accelerate); set {field}.mixed_precision={wanted} or null"
            )
        if wanted is None and train.mixed_precision is not None:
            wanted = train.mixed_precision
    return wanted


def check_processes(config: Any, processes: int) -> None:
    """The checks of a run config that depend on the number of processes, for every model it trains
    (run before anything is trained, so that a bad split never fails after the teacher's training).

    Raises:
        ConfigError: the first ``TrainConfig`` whose batch does not split (see :func:`check_batch_split`).
    """
    for field, train in train_configs(config):
        check_batch_split(train, processes, field)
