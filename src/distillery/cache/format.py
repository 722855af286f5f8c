"""The on-disk format of a teacher-output cache.

Layout of one cache folder::

    MANIFEST.json             written last: what the cache holds and a sha256 per shard
    shard-00000.safetensors   rows [0, R), shard-00001.safetensors rows [R, 2R), ...
    PLAN.json                 only while the cache is being written: the manifest without its shards

Each shard is a safetensors file with one tensor per stored quantity, leading dimension = the
shard's rows: ``index`` (the sample id of each row) and, by kind, ``logits`` (dense); ``ids``,
``logp`` (or 8-bit ``logp`` codes with ``logp_scale``) and ``tail`` (topk); ``ids``, ``counts``
and ``logp`` (sampled); ``feature.<name>`` for stored features. Shards are written under a
temporary name (``.shard-00000.safetensors.tmp``), flushed and renamed: a shard with its final
name is complete. Readers map shards into memory (:func:`open_tensors`) and copy only the rows a
batch asks for.

The manifest (format 1) holds ``identity`` (the teacher's weights hash, the tokenizer's hash, the
task), ``dataset`` (a hash of the teacher's inputs in row order, and the row count), the cache's
settings (``kind``, ``k``, ``draws``, ``values``, ``temperature``, ``features``, ``seed``), the
per-row ``shapes`` and ``dtypes`` of the tensors, ``shard_rows`` and ``shards`` (file, first row,
rows, bytes, sha256). It is written with sorted keys and no timestamps: the same inputs give the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillery.errors import DistilleryError

FORMAT = 1
MANIFEST = "MANIFEST.json"
PLAN = "PLAN.json"
FINGERPRINT_CHUNK = 256  # rows per get_batch when hashing a dataset (fixed: independent of any batch size)

# fields of the manifest that say what the cache holds, in the order a mismatch is reported, with
# the words a message uses for each
IDENTITY_FIELDS = (
    ("format", "cache format"),
    ("identity.task", "task"),
    ("identity.teacher", "teacher (hash of its weights)"),
    ("identity.tokenizer", "tokenizer (hash)"),
    ("kind", "cache kind"),
    ("k", "k"),
    ("draws", "draws"),
    ("values", "value storage"),
    ("temperature", "temperature"),
    ("seed", "sampling seed"),
    ("features", "features"),
    ("vocab_size", "vocabulary size"),
    ("positions", "positions per row"),
    ("dataset.rows", "dataset rows"),
    ("dataset.fingerprint", "dataset (hash of the inputs in row order)"),
)


class CacheError(DistilleryError):
    """A teacher-output cache that cannot serve this run; the message names the problem and the fix."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def temp_name(i: int) -> str:
    return f".{shard_name(i)}.tmp"


def dumps(record: Mapping[str, Any]) -> str:
    """JSON with sorted keys: the same record gives the same bytes."""
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """``(field, words, expected, found)`` for each identity field that differs."""
    return [
        (f, words, _get(expected, f), _get(found, f))
        for f, words in IDENTITY_FIELDS
        if _get(expected, f) != _get(found, f)
    ]


def short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 20 else text[:16] + "..."


def describe_differences(diffs: list[tuple[str, str, Any, Any]]) -> str:
    return "; ".join(f"{words}: the cache has {short(b)}, this run {short(a)}" for _, words, a, b in diffs)


# ---- hashes ------------------------------------------------------------------------------------------


def _update(digest, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensors_sha256(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes), in the order given."""
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode() + b"\0")
        _update(digest, t)
    return digest.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """The teacher's identity: a hash of its state dict (names sorted)."""
    state = module.state_dict()
    return tensors_sha256((k, state[k]) for k in sorted(state))


def dataset_fingerprint(dataset: Any, keys: Iterable[str]) -> str:
    """sha256 of the batch tensors ``keys`` (the teacher's inputs) and ``index`` of every row, in row
    order, read in fixed chunks of :data:`FINGERPRINT_CHUNK` rows."""
    keys = sorted(set(keys) | {"index"})
    digest = hashlib.sha256()
    for start in range(0, len(dataset), FINGERPRINT_CHUNK):
        batch = dataset.get_batch(torch.arange(start, min(start + FINGERPRINT_CHUNK, len(dataset))))
        for key in keys:
            if key in batch:
                digest.update(key.encode() + b"\0")
                _update(digest, batch[key])
    return digest.hexdigest()


# ---- shards ------------------------------------------------------------------------------------------

# safetensors dtype names -> numpy dtypes, of the tensors a cache stores
NUMPY_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "U8": np.uint8,
    "U16": np.uint16,
    "I32": np.int32,
    "I64": np.int64,
}


def open_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps (nothing is read until indexed)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        if stop == start:
            out[name] = np.zeros(shape, dtype=NUMPY_DTYPES[info["dtype"]])
            continue
        out[name] = np.memmap(
            path, dtype=NUMPY_DTYPES[info["dtype"]], mode="r", offset=8 + size + start, shape=shape
        )
    return out
