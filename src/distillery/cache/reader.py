"""Read a teacher-output cache: checked against the run, memory-mapped, looked up by sample id."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillery import functional as DF
from distillery.cache.format import (
    FORMAT,
    MANIFEST,
    PLAN,
    CacheError,
    describe_differences,
    differences,
    open_tensors,
    shard_name,
)
from distillery.fileio import sha256_file


def _ranges(ids: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


class OutputCache:
    """A complete cache folder (see :mod:`distillery.cache.format`), opened for reading.

    Opening reads the manifest, checks every shard's size and (with ``verify``) sha256, and maps the
    shards into memory; :meth:`lookup` then copies only the rows asked for. Files in the folder that
    the manifest does not list (a half-written shard of another program, a leftover temporary file)
    are never read; :attr:`strays` names them for a warning.

    Raises:
        CacheError: no cache in the folder, an unfinished one (naming its missing shards), an unknown
            format, or a shard that is missing, truncated or fails its checksum (naming it).
    """

    def __init__(self, path: str | Path, *, verify: bool = True, command: str | None = None) -> None:
        self.path = Path(path)
        self.seconds = 0.0  # time this process spent writing the cache (set by its writer's caller)
        how = command or "`distillery cache <config>`"
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            plan = self.path / PLAN
            if plan.is_file():
                spec = json.loads(plan.read_text())
                missing = [
                    shard_name(i)
                    for i in range(spec["num_shards"])
                    if not (self.path / shard_name(i)).is_file()
                ]
                what = (
                    f"{len(missing)} of {spec['num_shards']} shards are missing ({_ranges(missing, 3)})"
                    if missing
                    else f"its {spec['num_shards']} shards are written but not its {MANIFEST}"
                )
                raise CacheError(
                    f"the teacher-output cache at {self.path} is unfinished: {what}; run {how} again to finish it "
                    "(it continues from the shards written)"
                )
            raise CacheError(
                f"no teacher-output cache at {self.path} (no {MANIFEST}); write it with {how}, or let the run write "
                "it (teacher.outputs.write=missing)"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError:
            raise CacheError(
                f"{manifest_path} is not readable JSON; delete the folder and write the cache again"
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise CacheError(
                f"the cache at {self.path} has format {self.manifest.get('format')!r}; this version of distillery "
                f"reads format {FORMAT}: write the cache again"
            )
        listed = {s["file"] for s in self.manifest["shards"]} | {MANIFEST}
        self.strays = sorted(p.name for p in self.path.iterdir() if p.name not in listed)
        self.shards: list[dict[str, np.ndarray]] = []
        for s in self.manifest["shards"]:
            p = self.path / s["file"]
            problem = None
            if not p.is_file():
                problem = "is missing"
            elif p.stat().st_size != s["bytes"]:
                problem = f"has {p.stat().st_size} bytes where {s['bytes']} were written (truncated?)"
            elif verify and sha256_file(p) != s["sha256"]:
                problem = "fails its sha256 check (damaged or altered)"
            if problem:
                raise CacheError(
                    f"shard {s['file']} of the teacher-output cache at {self.path} {problem}; delete the folder and "
                    f"write the cache again ({how})"
                )
            self.shards.append(open_tensors(p))
        index = (
            np.concatenate([np.asarray(t["index"]) for t in self.shards])
            if self.shards
            else np.zeros(0, np.int64)
        )
        self._ids = torch.from_numpy(index.astype(np.int64))
        size = int(self._ids.max()) + 1 if len(self._ids) else 0
        self._where = torch.full((size,), -1, dtype=torch.long)
        self._where[self._ids] = torch.arange(len(self._ids))
        starts = [s["first"] for s in self.manifest["shards"]]
        self._shard_of = torch.tensor(starts, dtype=torch.long)

    # ---- what it holds ---------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def rows(self) -> int:
        return int(self.manifest["dataset"]["rows"])

    def nbytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.manifest["shards"])

    def check(self, expected: Mapping[str, Any], fix: str = "") -> None:
        """Refuse a cache written for another teacher, tokenizer, dataset or setting, naming the fields."""
        diffs = differences(expected, self.manifest)
        if diffs:
            raise CacheError(
                f"the teacher-output cache at {self.path} was written for other inputs: {describe_differences(diffs)}"
                f"; {fix or 'write the cache again for this run (delete the folder or choose another path)'}"
            )

    def missing(self, ids: Iterable[int] | Tensor) -> list[int]:
        """The sample ids of ``ids`` the cache holds no row for."""
        ids = torch.as_tensor(ids if isinstance(ids, Tensor) else list(ids), dtype=torch.long).reshape(-1)
        inside = ids < len(self._where)
        known = torch.zeros_like(ids, dtype=torch.bool)
        known[inside] = self._where[ids[inside]] >= 0
        return ids[~known].tolist()

    def check_covers(self, ids: Iterable[int] | Tensor, what: str = "the training data") -> None:
        missing = self.missing(ids)
        if missing:
            n = len(torch.as_tensor(ids if isinstance(ids, Tensor) else list(ids)).reshape(-1))
            names = [s["file"] for s in self.manifest["shards"]]
            held = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            raise CacheError(
                f"the teacher-output cache at {self.path} holds {self.rows} rows ({len(names)} shards, {held}), but "
                f"{len(missing)} of the {n} rows of {what} are not among them (sample ids {_ranges(missing)}); write "
                "the cache for this data (delete the folder, or choose another teacher.outputs.path)"
            )

    # ---- reading ---------------------------------------------------------------------------------------

    def lookup(self, ids: Tensor) -> dict[str, Tensor]:
        """The stored rows of sample ids ``ids`` ``[B]``, decoded: ``logits`` (float32, dense); ``ids``
        (int64), ``logp`` (float32) and ``tail`` (topk) or ``weights`` (sampled, count / draws);
        ``feature.<name>`` (float32). Each ``[B, *per-row shape]``."""
        ids = torch.as_tensor(ids).long().reshape(-1).cpu()
        missing = self.missing(ids)
        if missing:
            raise CacheError(f"no cached teacher outputs for sample ids {_ranges(missing)} in {self.path}")
        rows = self._where[ids]
        shard = torch.searchsorted(self._shard_of, rows, right=True) - 1
        first = self._shard_of[shard]
        out: dict[str, list] = {}
        order = []
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().squeeze(-1)
            local = (rows[sel] - first[sel]).numpy()
            order.append(sel)
            for name, array in self.shards[s].items():
                if name != "index":
                    out.setdefault(name, []).append(torch.from_numpy(np.asarray(array[local])))
        inverse = torch.empty_like(ids)
        inverse[torch.cat(order)] = torch.arange(len(ids))
        raw = {name: torch.cat(parts)[inverse] for name, parts in out.items()}
        return self._decode(raw)

    def _decode(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        m = self.manifest
        out: dict[str, Tensor] = {}
        for name, x in raw.items():
            if name in ("logp_scale", "counts"):
                continue
            if name == "ids":
                out[name] = x.long()
            elif name == "logp" and "logp_scale" in raw:
                out[name] = DF.dequantize_logprobs(x, raw["logp_scale"])
            else:
                out[name] = x.float()
        if "counts" in raw:
            out["weights"] = raw["counts"].float() / float(m["draws"])
        return out


def open_cache(path: str | Path, expected: Mapping[str, Any] | None = None, **kwargs) -> OutputCache:
    cache = OutputCache(path, **kwargs)
    if expected is not None:
        cache.check(expected)
    return cache


__all__ = ["OutputCache", "open_cache"]
