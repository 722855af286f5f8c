"""Teacher-output caches for the tasks (``teacher.source: cache``): where a seed's cache lives, writing
it when it is missing, and opening it checked against the run.

A task describes its teacher's outputs as an :class:`~distillery.cache.OutputSource` (the rows, the
teacher's forward, the teacher's identity); :func:`teacher_outputs` does the rest, the same way for
every task, and :func:`distillery.experiment.cache_outputs` (``distillery cache``) calls it for
every seed of a config without training any student.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from distillery.cache import CacheError, OutputCache, OutputsConfig, OutputSource, plan, write_outputs
from distillery.cache.format import MANIFEST
from distillery.teachers.store import config_hash, default_cache_root
from distillery.train.progress import TrainProgress


def outputs_root() -> Path:
    """Default home of teacher-output caches: ``<DISTILLERY_CACHE or ~/.cache/distillery>/outputs``."""
    return default_cache_root().parent / "outputs"


def cache_path(outputs: OutputsConfig, spec: dict[str, Any], seed: int) -> Path:
    """``teacher.outputs.path/seed-<seed>``, or a folder of :func:`outputs_root` named by a hash of
    what the cache holds (the teacher's weights, the data, the settings): another teacher or other data
    never lands in the same folder."""
    if outputs.path is not None:
        return Path(outputs.path).expanduser() / f"seed-{seed}"
    what = {k: spec[k] for k in ("identity", "dataset", "kind", "k", "draws", "values", "temperature",
                                 "features", "seed", "vocab_size", "positions")}  # fmt: skip
    return outputs_root() / config_hash(what)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_cache(cache: OutputCache, tokens: int | None = None) -> str:
    m = cache.manifest
    what = m["kind"] + ("" if m["k"] is None else f" k={m['k']}") + f", {m['values']}"
    size = cache.nbytes()
    per = f", {size / tokens:,.0f} B/token" if tokens else ""
    return f"{what}, {cache.rows:,} rows, {_bytes(size)}{per}"


def teacher_outputs(
    outputs: OutputsConfig,
    source: OutputSource,
    seed: int,
    context: Any,
    *,
    batch_size: int,
    tokens: int | None = None,
    write: bool | None = None,
) -> OutputCache:
    """The seed's cache of ``source``'s outputs: written first when missing (``teacher.outputs.write=
    missing``, or ``write=True``), then opened, its files checked against the manifest, its rows
    against the data and its manifest against the run (teacher, tokenizer, dataset, kind, k, ...).

    ``tokens`` (language models): the number of target tokens, for the bytes-per-token line.
    """
    acc, console = context.accelerator, context.console
    spec = plan(source, outputs)
    path = cache_path(outputs, spec, seed)
    allowed = outputs.write == "missing" if write is None else write
    if not (path / MANIFEST).is_file():
        if not allowed:
            raise CacheError(
                f"no teacher-output cache at {path} for seed {seed}; write it first with `distillery cache <this "
                "config>`, or set teacher.outputs.write=missing to let the run write it"
            )
        console.print(
            f"  seed {seed} teacher outputs: writing {outputs.kind} cache to {path}", soft_wrap=True
        )
        t0 = time.perf_counter()
        bars: list[TrainProgress] = []

        def progress(done: int, total: int) -> None:  # shards written, rows/s
            if not bars:
                bars.append(
                    TrainProgress(f"  seed {seed} teacher outputs (shards)", total, enabled=context.progress)
                )
            bars[0].update(done, 0 if done == 0 else spec["shard_rows"])

        try:
            write_outputs(
                path, source, outputs, batch_size=batch_size, spec=spec, process_index=acc.process_index,
                num_processes=acc.num_processes, barrier=acc.wait_for_everyone if acc.num_processes > 1 else None,
                progress=progress,
            )  # fmt: skip
        finally:
            for bar in bars:
                bar.close()
        seconds = time.perf_counter() - t0
        how = f"written in {seconds:.1f}s"
    else:
        seconds, how = 0.0, "read"
    cache = OutputCache(path, verify=outputs.verify, command="`distillery cache <this config>`")
    cache.seconds = seconds
    if cache.strays:
        console.print(
            f"  warning: {path} holds files the cache's manifest does not list, never read: {', '.join(cache.strays)}",
            soft_wrap=True,
        )
    cache.check_covers(_ids(source))
    cache.check(spec)
    console.print(
        f"  seed {seed} teacher outputs: {describe_cache(cache, tokens)} ({how}) {path}", soft_wrap=True
    )
    return cache


def _ids(source: OutputSource) -> torch.Tensor:
    """The sample ids of the source's rows."""
    d = source.dataset
    if hasattr(d, "index"):
        return torch.as_tensor(d.index)
    return torch.cat(
        [d.get_batch(torch.arange(s, min(s + 4096, len(d))))["index"] for s in range(0, len(d), 4096)]
    )


__all__ = ["CacheError", "cache_path", "outputs_root", "teacher_outputs"]
