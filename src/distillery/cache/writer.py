"""Write a teacher's outputs over a dataset once: shards of safetensors files and a manifest.

:func:`write_outputs` runs the teacher shard by shard, compresses its logits as the cache's kind
says (:func:`compress`) and writes every shard under a temporary name before renaming it. A writer
stopped at any point leaves complete shards only; running it again with the same inputs skips them,
writes the rest and ends with the same bytes as an uninterrupted run (shards are computed in fixed
batches from their first row, and sampled draws depend only on the seed and the row's id). Under
data parallelism process ``r`` of ``P`` writes shards ``r, r + P, ...``; after a barrier the main
process checksums them all into the one manifest.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_numpy
from torch import Tensor

from distillery import functional as DF
from distillery.cache.config import OutputsConfig
from distillery.cache.format import (
    FORMAT,
    MANIFEST,
    NUMPY_DTYPES,
    PLAN,
    CacheError,
    dataset_fingerprint,
    describe_differences,
    differences,
    dumps,
    shard_name,
    temp_name,
)
from distillery.fileio import disk_errors, fsync_dir, replace_durable, sha256_file, write_atomic

SHARD_BYTES = 64 << 20  # default shard size


@dataclass
class OutputSource:
    """What a task hands the writer: the rows, how to run the teacher on a batch of them, and who it is.

    Args:
        dataset: ``len()`` and ``get_batch(positions) -> dict`` with ``index`` (the stable sample ids).
        forward: ``batch -> output`` with ``.logits`` ``[B, V]`` (a classifier) or ``[B, T, V]`` (a language
            model, ``T <= positions``) in float32 and ``.features`` (named tensors ``[B, ...]``).
        keys: the batch keys the teacher reads (hashed into the dataset's fingerprint).
        vocab_size: the number of classes or token ids ``V``; None: the teacher gives no logits (a sentence
            encoder), and the cache holds its features only (kind dense).
        identity: ``{"task", "teacher" (hash of its weights), "tokenizer" (hash or None)}``.
        positions: language models: outputs per row, padded to this many positions; None: one per row.
        valid: ``batch -> [B, T]`` bool, the positions whose outputs are kept (others are stored as 0).
        device: where batches go before ``forward``.
    """

    dataset: Any
    forward: Callable[[Mapping[str, Tensor]], Any]
    keys: tuple[str, ...]
    vocab_size: int | None
    identity: dict[str, Any]
    positions: int | None = None
    valid: Callable[[Mapping[str, Tensor]], Tensor] | None = None
    device: torch.device | str = "cpu"
    feature_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


_DTYPES = {"fp32": "F32", "fp16": "F16"}


def tensor_specs(cfg: OutputsConfig, vocab: int | None, positions: int | None,
                 features: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per-row shape and safetensors dtype of every tensor a shard holds."""
    p = [] if positions is None else [positions]
    values = cfg.value_dtype
    specs: dict[str, tuple[list[int], str]] = {"index": ([], "I64")}
    if vocab is None:  # features only
        pass
    elif cfg.kind == "dense":
        specs["logits"] = ([*p, vocab], _DTYPES[values])
    else:
        k = int(cfg.k)
        specs["ids"] = ([*p, k], "U16" if vocab <= 65536 else "I32")
        specs["logp"] = ([*p, k], "U8" if values == "int8" else _DTYPES[values])
        if values == "int8":
            specs["logp_scale"] = (p, "F32")
        if cfg.kind == "topk":
            specs["tail"] = (p, "F32")  # fp16 would round small tails to 0 (an infinite reverse KL)
        else:
            specs["counts"] = ([*p, k], "U8" if int(cfg.num_draws) <= 255 else "U16")
    for name, shape in sorted(features.items()):  # stored per row as the teacher gave them
        specs[f"feature.{name}"] = (list(shape), _DTYPES["fp32" if values == "fp32" else "fp16"])
    return {name: {"shape": shape, "dtype": dtype} for name, (shape, dtype) in specs.items()}


def row_bytes(specs: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(math.prod(s["shape"]) * np.dtype(NUMPY_DTYPES[s["dtype"]]).itemsize for s in specs.values())


def _mix(seed: int, row: int) -> int:
    return (int(seed) * 1_000_003 + int(row) * 7_919 + 12_345) % (2**63 - 1)


def compress(logits: Tensor, index: Tensor, cfg: OutputsConfig) -> dict[str, Tensor]:
    """The stored form of a batch's teacher logits ``[B, *P, V]`` (float32) for ``cfg.kind``.

    dense: the logits; topk: :func:`~distillery.functional.topk_tail` at ``cfg.temperature``; sampled:
    :func:`~distillery.functional.sample_tokens` with a generator seeded by ``(cfg.seed, sample id)`` per
    row, its weights stored as integer counts out of ``draws``. int8 values: log-probabilities as
    :func:`~distillery.functional.quantize_logprobs` codes and per-token scales.
    """
    if cfg.kind == "dense":
        return {"logits": logits}
    k, t = int(cfg.k), cfg.temperature
    if cfg.kind == "topk":
        ids, logp, tail = DF.topk_tail(logits, k, temperature=t)
        out = {"ids": ids, "tail": tail}
    else:
        draws = int(cfg.num_draws)
        rows = []
        for i in range(logits.shape[0]):
            g = torch.Generator(device=logits.device).manual_seed(_mix(cfg.seed, int(index[i])))
            rows.append(DF.sample_tokens(logits[i], k, draws=draws, temperature=t, generator=g))
        ids, weights, logp = (torch.stack(parts) for parts in zip(*rows))
        out = {"ids": ids, "counts": torch.round(weights * draws)}
    if cfg.value_dtype == "int8":
        out["logp"], out["logp_scale"] = DF.quantize_logprobs(logp)
    else:
        out["logp"] = logp
    return out


def _batch_arrays(source: OutputSource, cfg: OutputsConfig, batch: Mapping[str, Tensor],
                  specs: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:  # fmt: skip
    device_batch = {k: v.to(source.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        out = source.forward(device_batch)
    index = batch["index"].cpu()
    parts = {} if source.vocab_size is None else compress(out.logits.float(), index, cfg)
    parts.update({f"feature.{n}": out.features[n].float() for n in cfg.features})
    keep = None if source.valid is None else source.valid(device_batch)
    arrays = {"index": index.numpy().astype(np.int64)}
    for name, spec in specs.items():
        if name == "index":
            continue
        x = parts[name].detach()
        if name.startswith("feature."):
            arrays[name] = x.cpu().numpy().astype(NUMPY_DTYPES[spec["dtype"]])
            continue
        if keep is not None:  # outputs at positions without a target are stored as zeros
            # where, not a product: -0.0 and 0.0 differ in bytes, and the bytes must not depend on batching
            x = torch.where(
                keep.to(x.device).reshape(*keep.shape, *([1] * (x.dim() - keep.dim()))),
                x,
                torch.zeros((), dtype=x.dtype),
            )
        shape = [x.shape[0], *spec["shape"]]
        if source.positions is not None and x.shape[1] < shape[1]:  # pad the positions of short batches
            pad = x.new_zeros((x.shape[0], shape[1] - x.shape[1], *x.shape[2:]))
            x = torch.cat([x, pad], dim=1)
        arrays[name] = x.cpu().numpy().astype(NUMPY_DTYPES[spec["dtype"]]).reshape(shape)
    return arrays


def probe_features(source: OutputSource, cfg: OutputsConfig) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the requested features (a one-row forward), or {} when none are requested."""
    if not cfg.features:
        return {}
    batch = source.dataset.get_batch(torch.arange(1))
    with torch.no_grad():
        out = source.forward({k: v.to(source.device) for k, v in batch.items()})
    missing = [n for n in cfg.features if n not in out.features]
    if missing:
        raise CacheError(
            f"teacher.outputs.features names {missing[0]!r}, which the teacher does not produce; it gives: "
            f"{', '.join(sorted(out.features)) or 'no features'}"
        )
    return {n: tuple(out.features[n].shape[1:]) for n in cfg.features}


def plan(source: OutputSource, cfg: OutputsConfig) -> dict[str, Any]:
    """The manifest of the cache to write, without its shards (what the folder will hold)."""
    if source.vocab_size is None and (cfg.kind != "dense" or not cfg.features):
        raise CacheError(
            f"this teacher gives no logits, only features: its cache needs teacher.outputs.kind=dense (got "
            f"{cfg.kind}) and the features to store"
        )
    if cfg.kind != "dense" and not 1 <= int(cfg.k) <= source.vocab_size:
        raise CacheError(
            f"teacher.outputs.k={cfg.k} must be between 1 and the vocabulary size {source.vocab_size}"
        )
    specs = tensor_specs(cfg, source.vocab_size, source.positions, probe_features(source, cfg))
    rows = len(source.dataset)
    shard_rows = cfg.shard_rows or max(1, SHARD_BYTES // max(row_bytes(specs), 1))
    return {
        "format": FORMAT,
        "identity": dict(source.identity),
        "dataset": {"rows": rows, "fingerprint": dataset_fingerprint(source.dataset, source.keys)},
        **cfg.identity(),
        "vocab_size": source.vocab_size,
        "positions": source.positions,
        "tensors": specs,
        "shard_rows": int(shard_rows),
        "num_shards": max(1, math.ceil(rows / shard_rows)),
    }


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(
            f"the cache folder {path} is not writable ({exc.strerror or exc}); choose another teacher.outputs.path "
            "(or DISTILLERY_CACHE), or fix the folder's permissions"
        ) from None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _refuse_other(path: Path, what: str, expected: dict, found: dict) -> None:
    diffs = differences(expected, found)
    if diffs:
        raise CacheError(
            f"the folder {path} holds {what} written with other settings ({describe_differences(diffs)}); "
            "delete the folder, or set teacher.outputs.path to another folder"
        )


def write_shard(path: Path, i: int, source: OutputSource, cfg: OutputsConfig, spec: Mapping[str, Any],
                batch_size: int) -> None:  # fmt: skip
    """Compute shard ``i`` (rows ``[i R, (i + 1) R)``) in batches of ``batch_size`` and write it atomically."""
    r = spec["shard_rows"]
    start, stop = i * r, min((i + 1) * r, spec["dataset"]["rows"])
    pieces: list[dict[str, np.ndarray]] = []
    for b in range(start, stop, batch_size):
        batch = source.dataset.get_batch(torch.arange(b, min(b + batch_size, stop)))
        pieces.append(_batch_arrays(source, cfg, batch, spec["tensors"]))
    arrays = {
        name: np.ascontiguousarray(np.concatenate([p[name] for p in pieces])) for name in spec["tensors"]
    }
    tmp, final = path / temp_name(i), path / shard_name(i)
    with disk_errors(tmp):
        data = save_numpy(arrays, metadata={"distillery.cache": str(FORMAT)})
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    replace_durable(tmp, final)


def write_outputs(
    path: str | Path,
    source: OutputSource,
    cfg: OutputsConfig,
    *,
    batch_size: int = 256,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write (or finish) the cache of ``source``'s teacher outputs in ``path``; return its manifest.

    A folder that already holds the complete cache is left as it is (its manifest is returned); one
    that holds a cache or a partial cache written with other settings is refused, naming the field
    that differs. ``progress(done, total)`` is called before this process's first shard (``done=0``) and
    after each shard it writes; ``spec`` is
    :func:`plan` of the same inputs, when the caller has it already.
    """
    path = Path(path)
    spec = plan(source, cfg) if spec is None else spec
    existing = _read_json(path / MANIFEST)
    if existing is not None:
        _refuse_other(path, "a teacher-output cache", spec, existing)
        return existing
    _check_writable(path)  # every process checks (and refuses) alike, so none waits at a barrier alone
    started = _read_json(path / PLAN)
    if started is not None:
        _refuse_other(path, "a partial teacher-output cache", spec, started)
        if started.get("shard_rows") != spec["shard_rows"]:
            raise CacheError(
                f"the folder {path} holds a partial cache written with {started.get('shard_rows')} rows per shard; "
                f"finish it with teacher.outputs.shard_rows={started.get('shard_rows')}, or delete the folder"
            )
    elif process_index == 0:
        write_atomic(path / PLAN, dumps(spec))
    if barrier is not None:
        barrier()
    mine = [i for i in range(spec["num_shards"]) if i % num_processes == process_index]
    todo = [i for i in mine if not (path / shard_name(i)).is_file()]
    if progress is not None:
        progress(0, len(todo))
    for done, i in enumerate(todo, 1):
        write_shard(path, i, source, cfg, spec, batch_size)
        if progress is not None:
            progress(done, len(todo))
    if barrier is not None:
        barrier()
    manifest = finish(path, spec) if process_index == 0 else None
    if barrier is not None:  # nobody reads the cache before the main process has written its manifest
        barrier()
    return manifest if manifest is not None else json.loads((path / MANIFEST).read_text())


def finish(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Checksum the shards into ``MANIFEST.json``, then remove the plan and this writer's temporary files."""
    r, rows = spec["shard_rows"], spec["dataset"]["rows"]
    shards = []
    for i in range(spec["num_shards"]):
        p = path / shard_name(i)
        shards.append({"file": p.name, "first": i * r, "rows": min(r, rows - i * r), "bytes": p.stat().st_size,
                       "sha256": sha256_file(p)})  # fmt: skip
    manifest = {**spec, "shards": shards}
    write_atomic(path / MANIFEST, dumps(manifest))
    for i in range(spec["num_shards"]):
        (path / temp_name(i)).unlink(missing_ok=True)
    (path / PLAN).unlink(missing_ok=True)
    fsync_dir(path)
    return manifest
