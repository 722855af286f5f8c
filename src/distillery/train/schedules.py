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
