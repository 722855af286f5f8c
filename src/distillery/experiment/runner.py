"""``distillery run``: one experiment runner for every task.

For every seed: the task prepares the seed's data; the runner obtains the teacher once (trains it
and caches it by config hash, or loads it), seeds torch with the run seed and builds the student's
initial weights once, then trains every arm from those weights through :func:`distillery.train.fit`:
the paired baseline first, then the distilled arm(s). Evaluation during training (learning curves)
uses the validation split the task carves from its training data; the test split is evaluated
once, after training, and gives the reported numbers. Then it aggregates over seeds (mean +- std,
paired differences) and writes the run directory::

    <run_dir>/config.yaml            the resolved config, written first
    <run_dir>/summary.json           every number of the report
    <run_dir>/report.md              tables and the learning-curve plot
    <run_dir>/learning_curves.png
    <run_dir>/seed-<s>/teacher.json     (several teachers: each member's record under "members")
    <run_dir>/seed-<s>/<arm>/{metrics.jsonl, checkpoints/, result.json, the saved student}

With ``resume``, finished arms (a ``result.json``) are kept and an interrupted arm continues from its
last checkpoint. What differs between tasks (data, models, arms, metrics, how a student is saved) is
asked of the task (:mod:`distillery.tasks.base`); the runner never branches on the task.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from distillery.errors import ConfigError
from distillery.experiment.cards import hub_folder, model_card, push_to_hub, teacher_card, write_model_card
from distillery.experiment.rundir import start_run, write_atomic
from distillery.experiment.summary import print_summary, summarize, write_report
from distillery.fileio import disk_errors, sha256_file
from distillery.models import count_parameters
from distillery.tasks import RunConfigBase, RunContext, Task, TeacherSpec, task_class
from distillery.tasks.base import BASELINE
from distillery.teachers import DamagedTeacherError, TeacherStore, teacher_key, training_code_version
from distillery.train import FitResult, fit
from distillery.train.trackers import Trackers


@dataclass
class RunResult:
    """Everything a run produced: per-seed records and the aggregate written to ``summary.json``.

    ``arms[arm][seed]`` and ``teachers[seed]`` are the records written to ``result.json`` and
    ``teacher.json``; ``summary`` is ``summary.json``.
    """

    run_dir: Path
    config: RunConfigBase
    task: Any = None
    teachers: dict[int, dict[str, Any]] = field(default_factory=dict)
    arms: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------


def obtain_teacher(spec: TeacherSpec, seed: int, context: RunContext) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher of ``spec``: loaded, reused from the cache, or trained now (and cached).

    The main process does the cache's IO. It trains a teacher only while holding the key's lock
    (:meth:`TeacherStore.lock`), and looks in the cache again once it has the lock, so that two runs
    needing the same teacher train it once; a damaged entry is moved aside and the teacher trained
    again. The other processes of a data-parallel run follow its decision: they load the entry it
    found, or train alongside it.
    """
    acc, console = context.accelerator, context.console
    if spec.load is not None:
        model, source = spec.load()
        return model, {"source": source, "cached": False, "loaded": True, "seconds": 0.0}
    store = TeacherStore(spec.cache_dir)
    key = teacher_key(spec.cache_key)
    with ExitStack() as held:
        model = None
        if spec.cache and acc.is_main_process:
            model = _cached_teacher(spec, store, key, seed, console)
            if model is None:

                def waiting(owner: str) -> None:
                    console.print(
                        f"  seed {seed} teacher: waiting for another process ({owner}) training this teacher",
                        soft_wrap=True,
                    )

                held.enter_context(store.lock(key, on_wait=waiting))
                model = _cached_teacher(spec, store, key, seed, console)  # finished meanwhile?
                if model is not None:
                    console.print(f"  seed {seed} teacher: trained by another process", soft_wrap=True)
        cached = model is not None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            holder = [cached]
            broadcast_object_list(holder)
            cached = holder[0]
        if cached:
            if model is None:  # not the main process: load what it found
                model = spec.build()
                store.load(key, model)
            return model, {"source": str(store.path(key)), "cache_key": key, "cached": True, "seconds": 0.0}
        t0 = time.perf_counter()
        model = spec.train()
        seconds = time.perf_counter() - t0
        info = {"cache_key": key, "cached": False, "seconds": seconds}
        if spec.cache and acc.is_main_process:
            meta = {
                "seed": seed,
                "seconds": seconds,
                "code": training_code_version(),
                "payload": spec.cache_key,
            }
            info["source"] = str(store.save(key, model, meta))
        acc.wait_for_everyone()
    return model, info


def _cached_teacher(
    spec: TeacherSpec, store: TeacherStore, key: str, seed: int, console: Console
) -> nn.Module | None:
    """The cached teacher of ``key``, or None if there is none (a damaged one is moved aside)."""
    if not store.has(key):
        return None
    model = spec.build()
    try:
        store.load(key, model)
    except DamagedTeacherError as exc:
        moved = store.quarantine(key)
        console.print(
            f"  seed {seed} teacher: the cached teacher is damaged ({exc.path}: {exc.problem}); "
            f"moved it aside to {moved} and training it again",
            soft_wrap=True,
            markup=False,
        )
        return None
    return model


def _evaluated_teacher(
    task: Task, spec: TeacherSpec, data: Any, seed: int, context: RunContext
) -> tuple[nn.Module, dict[str, Any]]:
    """One teacher (or one member of several) obtained, on the run's device, with its test metrics
    and one console line."""
    acc, console = context.accelerator, context.console
    model, info = obtain_teacher(spec, seed, context)
    model = model.to(acc.device)
    if spec.label is not None:
        info = {"name": spec.label, **info}
    info.update(metrics=task.evaluate(model, data, "test", None), params=count_parameters(model))
    if info.get("loaded"):
        how = f"loaded from {info['source']}"
    else:
        how = "cached" if info["cached"] else f"trained in {info['seconds']:.1f}s"
    who = "teacher" if spec.label is None else f"teacher {spec.label}"
    console.print(f"  seed {seed} {who}: {_metric_line(task, info['metrics'])} ({how})")
    return model, info


def _add_teacher_card(
    spec: TeacherSpec, info: dict[str, Any], cfg: RunConfigBase, seed: int, data: str, run_dir: Path, command
) -> None:
    """The model card of a teacher-cache entry this run just trained (none for a cached or loaded one)."""
    if not info.get("cached") and not info.get("loaded") and "source" in info:
        card = teacher_card(cfg, seed, info, data, run_dir, command, section=spec.section)
        TeacherStore(spec.cache_dir).add_card(info["cache_key"], card)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


# What an arm folder holds besides the student the task saved.
_NOT_SAVED = ("checkpoints", "tensorboard", "metrics.jsonl", "result.json")


def saved_files(arm_dir: Path) -> dict[str, str]:
    """sha256 of every file the task saved for a finished arm (its student), by path in the arm folder."""
    return {
        p.relative_to(arm_dir).as_posix(): sha256_file(p)
        for p in sorted(arm_dir.rglob("*"))
        if p.is_file()
        and p.relative_to(arm_dir).parts[0] not in _NOT_SAVED
        and not any(part.startswith(".") for part in p.relative_to(arm_dir).parts)
    }


def finished_arm(arm_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A finished arm's record, or what is wrong with it: ``result.json`` unreadable, or a saved file
    missing or different from the checksum the record holds (records of older versions hold none)."""
    done = arm_dir / "result.json"
    try:
        record = json.loads(done.read_text())
        if not isinstance(record, dict) or "metrics" not in record:
            raise ValueError("not a result record")
    except (OSError, ValueError) as exc:
        return None, f"{done} is damaged ({exc})"
    for rel, sha in (record.get("files") or {}).items():
        path = arm_dir / rel
        if not path.is_file():
            return None, f"{path} is missing"
        if sha256_file(path) != sha:
            return None, f"{path} is damaged (its sha256 differs from the one in result.json)"
    return record, None


def _metric_line(task: Task, metrics: dict[str, float]) -> str:
    parts = [
        f"{m.header.removesuffix(' %')} {metrics[m.key]:.{m.digits}f}{m.unit}"
        for m in task.metrics
        if m.key in metrics
    ]
    return ", ".join(parts)


def run(
    cfg: RunConfigBase,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    accelerator=None,
    command: list[str] | None = None,
) -> RunResult:
    """Execute a run config of any task; see the module docstring for what it writes.

    ``command`` is the command line that reproduces the run (``["run", "digits-kd", "seeds=[0]"]``),
    quoted in the model cards; without it the cards name the saved ``config.yaml`` only.
    """
    context, folder = start_run(cfg, resume, console, progress, accelerator)
    failed = True
    trackers = Trackers([])
    try:
        if context.accelerator.is_main_process:
            trackers = Trackers.start(
                cfg.output.report_to, context.run_dir, cfg.name, cfg.model_dump(mode="json")
            )
        result = _run(cfg, context, resume, trackers, command)
        failed = False
        return result
    finally:
        trackers.finish()
        # a run that fails before writing anything resumable leaves no folder behind
        folder.close(failed=failed)


def _run(
    cfg: RunConfigBase, context: RunContext, resume: bool, trackers: Trackers, command: list[str] | None
) -> RunResult:
    acc, console, run_dir = context.accelerator, context.console, context.run_dir
    main = acc.is_main_process
    t_start = time.perf_counter()
    task = task_class(cfg.task)(cfg, context)
    arms = task.arms()
    result = RunResult(run_dir=run_dir, config=cfg, task=task, arms={arm: {} for arm in arms})
    console.print(f"[bold]{cfg.name}[/bold]: {len(cfg.seeds)} seed(s), arms: {', '.join(arms)} -> {run_dir}")

    for i, seed in enumerate(cfg.seeds):
        data = task.prepare(seed)
        if i == 0:
            console.print(f"  {task.describe(data)}")
        seed_dir = run_dir / f"seed-{seed}"

        # ---- teacher, once per seed --------------------------------------------------------------
        teacher = None
        spec = task.teacher(data)
        if spec is not None:
            if spec.members is None:
                teacher, info = _evaluated_teacher(task, spec, data, seed, context)
                entries = [(spec, info)]
            else:  # several teachers: each obtained, cached and evaluated as one teacher, then combined
                modules, members = [], []
                for member in spec.members:
                    module, member_info = _evaluated_teacher(task, member, data, seed, context)
                    modules.append(module)
                    members.append(member_info)
                entries = list(zip(spec.members, members))
                teacher = spec.combine(modules).to(acc.device)
                info = {
                    "source": "members",
                    "cached": all(m["cached"] for m in members),
                    "loaded": all(m.get("loaded", False) for m in members),
                    "seconds": sum(m["seconds"] for m in members),
                    "metrics": task.evaluate(teacher, data, "test", None),
                    "params": count_parameters(teacher),
                    "members": members,
                }
                console.print(f"  seed {seed} teacher (combined): {_metric_line(task, info['metrics'])}")
            result.teachers[seed] = info
            if main:
                write_atomic(seed_dir / "teacher.json", json.dumps(info, indent=2))
                for entry, entry_info in entries:  # each entry this run just trained gets its model card
                    _add_teacher_card(entry, entry_info, cfg, seed, task.describe(data), run_dir, command)

        # ---- arms, all from the same initial weights ---------------------------------------------
        torch.manual_seed(seed)
        init_state = {k: v.clone() for k, v in task.new_student(data).state_dict().items()}
        trained: dict[str, nn.Module] = {}  # arm -> exported student
        records: dict[str, dict[str, Any]] = {}
        for arm in arms:
            arm_dir = seed_dir / arm
            done = arm_dir / "result.json"
            if resume and done.is_file():
                record, problem = finished_arm(arm_dir)
                if problem is None:
                    records[arm] = record
                    trained[arm] = task.load(arm_dir, data)
                    console.print(f"  seed {seed} {arm}: already complete")
                    continue
                console.print(
                    f"  seed {seed} {arm}: {problem}; finishing the arm again from its last checkpoint",
                    markup=False,
                    highlight=False,
                )
            job = task.arm(arm, data, teacher, init_state, trained)
            if job.train is None:  # an arm evaluated as it was built (e.g. a layer-dropped encoder)
                fitted = FitResult(model=job.model.to(acc.device), steps=0)
            else:
                fitted = fit(
                    job.model,
                    job.train_set,
                    job.objective,
                    job.train,
                    teacher=job.teacher,
                    adapter=job.adapter,
                    seed=seed,
                    run_dir=arm_dir,
                    evaluate=job.evaluate,
                    resume=resume,
                    accelerator=acc,
                    progress=context.progress,
                    label=f"seed {seed} {arm}",
                    tensorboard=cfg.output.tensorboard,
                    trackers=trackers.scoped(f"seed-{seed}/{arm}"),
                    batch_transform=job.batch_transform,
                    before_step=job.before_step,
                )
            student = job.export(fitted.model)
            # the test split, once, after training (evaluation during training saw the validation split)
            final = (
                job.test(fitted.model)
                if job.test is not None
                else task.evaluate(student, data, "test", teacher)
            )
            record = {
                "seed": seed,
                "arm": arm,
                "metrics": {k: v for k, v in final.items() if "@" not in k},
                "params": count_parameters(student),
                "steps": fitted.steps,
                "seconds": fitted.seconds,
                "samples_per_second": fitted.samples_per_second,
                "train_examples": len(job.train_set),
                "history": fitted.history,
            }
            if job.record is not None:
                record.update(job.record(fitted.model, final))
            trackers.scoped(f"seed-{seed}/{arm}").log(fitted.steps, "test", record["metrics"])
            if main:
                with disk_errors(arm_dir):  # a full disk is reported as one, whatever the writer raised
                    task.save(student, arm_dir, data)
                    if job.save_extra is not None:
                        job.save_extra(fitted.model, arm_dir)
                card = model_card(
                    cfg, seed, arm, task.label(arm), record, result.teachers.get(seed), records.get(BASELINE),
                    task.describe(data), run_dir, command,
                )  # fmt: skip
                write_model_card(arm_dir, card)
                record["files"] = saved_files(arm_dir)  # checked when a resumed run reuses this arm
                write_atomic(done, json.dumps(record, indent=2))
            records[arm] = record
            trained[arm] = student
            console.print(
                f"  seed {seed} {arm}: {_metric_line(task, record['metrics'])} "
                f"({fitted.seconds:.1f}s, {fitted.samples_per_second:,.0f} examples/s)"
            )
            for line in task.arm_lines(record):
                console.print(line)
            for warning in record.get("warnings", []):
                console.print(f"  [bold yellow]warning[/]: seed {seed} {arm}: {escape(warning)}")
        for arm, record in task.combined_arms(data, trained, records).items():
            records[arm] = {"seed": seed, "arm": arm, **record}
            result.arms.setdefault(arm, {})
            console.print(f"  seed {seed} {task.label(arm)}: {_metric_line(task, record['metrics'])}")
        for arm, record in records.items():
            result.arms[arm][seed] = record

    result.seconds = time.perf_counter() - t_start
    result.summary = summarize(result)
    if main:
        write_report(result)
    print_summary(result, console)
    if cfg.output.push_to_hub and main:
        folder = hub_folder(run_dir, cfg.seeds[0])
        try:
            url = push_to_hub(cfg.output.push_to_hub, folder)
        except Exception as exc:  # network, login, permissions: the run itself is complete and kept
            raise ConfigError(
                f"output.push_to_hub: uploading {folder} to {cfg.output.push_to_hub!r} failed ({type(exc).__name__}: "
                f"{exc}); log in (`hf auth login`) and check the repo id; the run is complete in {run_dir}"
            ) from None
        console.print(f"pushed {folder} to {url}")
    return result
