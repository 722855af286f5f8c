"""Schedules precomputed as arrays, so they can be inspected and plotted before training."""

from __future__ import annotations

import numpy as np
import torch

from distillery.train.config import OptimizerConfig, ScheduleConfig


def lr_multipliers(cfg: ScheduleConfig, total_steps: int) -> np.ndarray:
    """Multiplier of the peak learning rate at each of ``total_steps`` steps."""
    s = np.arange(total_steps, dtype=np.float64)
    warm = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)
    progress = np.clip((s - warm) / max(1, total_steps - warm), 0.0, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.name == "constant":
        mult = np.ones_like(s)
    elif cfg.name == "cosine":
        mult = lo + (1 - lo) * 0.5 * (1 + np.cos(np.pi * progress))
    elif cfg.name == "linear":
        mult = lo + (1 - lo) * (1 - progress)
    else:  # step
        passed = sum((s >= m * total_steps).astype(np.float64) for m in cfg.milestones)
        mult = cfg.gamma**passed
    if warm > 0:
        mult = np.where(s < warm, (s + 1) / warm, mult)
    return mult


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    mult = lr_multipliers(cfg, total_steps)
    last = len(mult) - 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(mult[min(step, last)]))


def cosine_schedule(
    base: float, final: float, total_steps: int, *, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """A value per step: linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a
    half cosine from ``base`` to ``final`` (reached at the step after the last: the last value is just
    above it).

    The schedule of DINO's code (``utils.cosine_scheduler``, per iteration) for the learning rate
    (warm-up, cosine to a minimum), the weight decay (0.04 -> 0.4) and the EMA momentum (0.996 -> 1):
    step ``i`` of the cosine part is ``final + (base - final) (1 + cos(pi i / n)) / 2`` with ``n`` its
    number of steps.

    Example:
        >>> cosine_schedule(1.0, 0.0, 4).round(3).tolist()
        [1.0, 0.854, 0.5, 0.146]
        >>> cosine_schedule(1.0, 0.0, 4, warmup_steps=2).round(3).tolist()
        [0.0, 1.0, 1.0, 0.5]
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"a schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps; got {total_steps} and "
            f"{warmup_steps}"
        )
    warm = np.linspace(warmup_start, base, warmup_steps) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    i = np.arange(n, dtype=np.float64)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([warm, cos])


def warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """A value per step: linear from ``start`` to ``end`` over ``warmup_steps`` (both ends included),
    then ``end``: DINO's teacher-temperature warm-up (0.04 -> 0.07 over 30 epochs in the paper).

    Example:
        >>> warmup_then_constant(0.04, 0.07, 4, 6).round(2).tolist()
        [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"a schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps; got {total_steps} and "
            f"{warmup_steps}"
        )
    return np.concatenate([np.linspace(start, end, warmup_steps), np.full(total_steps - warmup_steps, end)])
