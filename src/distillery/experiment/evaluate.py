"""``distillery eval RUN_DIR [--data D]``: reload the saved students of a finished run and evaluate them
again, on the run's test split or on another test set."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from torch import nn

from distillery.config import read_yaml, validate_config
from distillery.errors import ConfigError
from distillery.experiment.rundir import read_run_config
from distillery.experiment.runner import RunResult
from distillery.experiment.summary import print_summary, summarize
from distillery.models import count_parameters
from distillery.tasks import RunContext, TeacherSpec, task_class
from distillery.tasks.base import deep_merge
from distillery.teachers import TeacherStore
from distillery.train import make_accelerator


def find_run_root(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if (candidate / "config.yaml").is_file() and any(candidate.glob("seed-*")):
            return candidate
    raise ConfigError(f"{path} is not inside a run directory (no config.yaml with seed-* folders found)")


def _saved_teacher(spec: TeacherSpec | None, info: dict) -> nn.Module | None:
    """The teacher a run used, if it can still be had: loaded again, or from the teacher cache."""
    if spec is None:
        return None
    if spec.members is not None:  # several teachers: every member, or none
        infos = info.get("members") or []
        if len(infos) != len(spec.members):
            return None
        modules = [_saved_teacher(member, member_info) for member, member_info in zip(spec.members, infos)]
        return None if any(m is None for m in modules) else spec.combine(modules)
    if spec.load is not None:
        return spec.load()[0]
    store = TeacherStore(spec.cache_dir)
    key = info.get("cache_key", "")
    if not key or not store.has(key):
        return None
    model = spec.build()
    store.load(key, model)
    return model


# data sections that read the user's files: `--data FILE` makes FILE their test split
FILE_DATA = ("files", "text", "prompt_completion", "messages")


def with_test_data(cfg, data: str | Path):
    """``cfg`` with another test set: a YAML file holding a ``data`` section (or the section itself)
    merged over the run's, or a data file (CSV, JSONL, Parquet, text, a ``save_to_disk`` folder) that
    becomes the test split of a run on user files."""
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"--data {path} does not exist; give a YAML data section or a data file")
    config = cfg.model_dump(mode="json")
    section = dict(config.get("data") or {})
    if path.suffix in (".yaml", ".yml"):
        given = read_yaml(path)
        config["data"] = deep_merge(section, given.get("data", given))
    else:
        if section.get("name") not in FILE_DATA:
            raise ConfigError(
                f"--data {path}: this run used the built-in data {section.get('name')!r}; a data file can replace "
                "the test split of a run on your own files only -- give a YAML file with a data section instead"
            )
        config["data"] = {**section, "test": {"path": str(path)}}
    return validate_config(config, source=f"--data {path}")


def evaluate_run(
    path: str | Path, console: Console | None = None, data: str | Path | None = None
) -> RunResult:
    """Reload every saved student of a run directory (a run, one seed or one arm) and evaluate it
    again on the test split -- or, with ``data``, on another test set (see :func:`with_test_data`);
    the teacher comes back from the cache for the agreement metrics."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    root = find_run_root(path)
    cfg = read_run_config(root)
    if data is not None:
        cfg = with_test_data(cfg, data)
    console = console or Console(emoji=False)
    context = RunContext(accelerator=make_accelerator(), console=console, progress=False, run_dir=root)
    task = task_class(cfg.task)(cfg, context)
    result = RunResult(run_dir=root, config=cfg, task=task)
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        seed_dir = root / f"seed-{seed}"
        if not seed_dir.is_dir():
            continue
        data = task.prepare(seed)
        teacher = None
        info_path = seed_dir / "teacher.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            teacher = _saved_teacher(task.teacher(data), info)
            if teacher is None:
                console.print(f"  seed {seed}: teacher no longer in the cache; agreement not computed")
            else:
                info.update(
                    metrics=task.evaluate(teacher, data, "test", None),
                    seconds=0.0,
                    cached=True,
                    params=count_parameters(teacher),
                )
                result.teachers[seed] = info
        for arm_dir in sorted(p for p in seed_dir.iterdir() if task.saved(p)):
            if path != root and path not in (seed_dir, arm_dir):
                continue
            arm = arm_dir.name
            student = task.load(arm_dir, data)
            saved = (
                json.loads((arm_dir / "result.json").read_text())
                if (arm_dir / "result.json").is_file()
                else {}
            )
            result.arms.setdefault(arm, {})[seed] = {
                "seed": seed,
                "arm": arm,
                "metrics": task.evaluate(student, data, "test", teacher),
                "params": count_parameters(student),
                "seconds": saved.get("seconds", 0.0),
                "train_examples": saved.get("train_examples", 0),
                "history": saved.get("history", []),
            }
    if not result.arms:
        raise ConfigError(f"no saved student found under {path}")
    result.seconds = time.perf_counter() - t0
    result.summary = summarize(result)
    print_summary(result, console)
    return result
