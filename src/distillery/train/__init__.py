"""The training loop (Hugging Face Accelerate), checkpoints, schedules, metric logging."""

from distillery.train.config import OptimizerConfig, ScheduleConfig, TrainConfig
from distillery.train.loop import FitResult, fit, make_accelerator

__all__ = ["FitResult", "OptimizerConfig", "ScheduleConfig", "TrainConfig", "fit", "make_accelerator"]
