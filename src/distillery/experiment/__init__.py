"""The task-agnostic experiment runner: run folder, seeds x arms with a paired baseline, the teacher
once per seed, records, summary and report, resume, and re-evaluation of a finished run.

- :func:`run` executes a run config of any task (:mod:`distillery.experiment.runner`);
- :func:`cache_outputs` writes the teacher-output caches of a config (``distillery cache``);
- :func:`evaluate_run` reloads a run's students and evaluates them again (``distillery eval``).
"""

from distillery.experiment.evaluate import evaluate_run
from distillery.experiment.outputs import cache_outputs
from distillery.experiment.runner import RunResult, run

__all__ = ["RunResult", "cache_outputs", "evaluate_run", "run"]
