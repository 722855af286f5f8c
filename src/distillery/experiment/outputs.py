"""``distillery cache``: write the teacher-output caches of a config's seeds, training no student.

For each seed the teacher is obtained as a run would (loaded, reused from the teacher cache, or
trained and cached) and its outputs over the training rows are written to the seed's cache folder
(:mod:`distillery.tasks.outputs`). A command stopped part-way continues from the shards written;
a cache already complete is checked and left as it is. Runs of the same config then read it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from distillery.errors import ConfigError
from distillery.experiment.runner import obtain_teacher
from distillery.tasks import task_class
from distillery.tasks.base import RunContext
from distillery.train.loop import make_accelerator


def cache_outputs(
    cfg: Any, *, console: Console | None = None, progress: bool = True, accelerator=None
) -> list[dict[str, Any]]:
    """Write (or finish, or check) the teacher-output cache of every seed of ``cfg``.

    Returns one record per seed: ``seed``, ``path``, ``rows``, ``bytes``, ``seconds`` (0 when the
    cache was complete already).

    Raises:
        ConfigError: the config's teacher is not ``source: cache``, or its task has no such cache.
    """
    teacher = getattr(cfg, "teacher", None)
    if getattr(teacher, "source", None) != "cache":
        raise ConfigError(
            f"distillery cache writes the outputs of a teacher with teacher.source=cache, but {cfg.name} has "
            f"teacher.source={getattr(teacher, 'source', None)}; add teacher.source=cache (and teacher.outputs.kind="
            "dense|topk|sampled, teacher.outputs.k=...) or use a cached recipe such as lm-kd-cached"
        )
    acc = accelerator or make_accelerator()
    console = console or Console(emoji=False)
    if not acc.is_main_process:
        console.quiet = True
    context = RunContext(acc, console, progress and acc.is_main_process, Path(tempfile.gettempdir()))
    task = task_class(cfg.task)(cfg, context)
    console.print(f"[bold]{cfg.name}[/bold]: teacher outputs for {len(cfg.seeds)} seed(s)")
    records = []
    for i, seed in enumerate(cfg.seeds):
        data = task.prepare(seed)
        if i == 0:
            console.print(f"  {task.describe(data)}")
        spec = task.teacher(data)
        model, info = obtain_teacher(spec, seed, context)
        how = (
            "loaded"
            if info.get("loaded")
            else "cached"
            if info.get("cached")
            else f"trained in {info['seconds']:.1f}s"
        )
        console.print(f"  seed {seed} teacher: {how}")
        cache = task.teacher_outputs(data, model.to(acc.device), write=True)
        records.append({"seed": seed, "path": str(cache.path), "rows": cache.rows, "bytes": cache.nbytes(),
                        "seconds": cache.seconds})  # fmt: skip
    return records
