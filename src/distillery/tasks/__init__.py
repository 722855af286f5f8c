"""Kinds of work the experiment runner executes, one module each, named in configs by ``task:``.

:data:`TASKS` is the explicit table of task names; the protocol a task implements is described in
:mod:`distillery.tasks.base`. Adding a task is one module and one row here.
"""

from __future__ import annotations

from distillery.errors import ConfigError
from distillery.tasks.base import (
    BASELINE,
    DISTILLED,
    ArmJob,
    BaseTask,
    Metric,
    RunConfigBase,
    RunContext,
    Section,
    Task,
    TeacherSpec,
)
from distillery.tasks.classification import ClassificationTask
from distillery.tasks.encoder import EncoderTask
from distillery.tasks.lm import LMTask
from distillery.tasks.semi import SemiTask
from distillery.tasks.ssl import SSLTask

# task name (the `task:` key of a config) -> task class
TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "encoder": EncoderTask,
    "lm": LMTask,
    "semi": SemiTask,
    "ssl": SSLTask,
}
DEFAULT_TASK = "classification"


def task_class(name: str) -> type[Task]:
    """The task named ``name``; an unknown name is a config error that lists the valid ones."""
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = [
    "BASELINE",
    "DEFAULT_TASK",
    "DISTILLED",
    "TASKS",
    "ArmJob",
    "BaseTask",
    "Metric",
    "RunConfigBase",
    "RunContext",
    "Section",
    "Task",
    "TeacherSpec",
    "task_class",
]
