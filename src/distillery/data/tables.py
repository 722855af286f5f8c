"""User data as Hugging Face ``datasets`` tables: JSONL, CSV, Parquet, plain text, a dataset saved
with ``save_to_disk``, or a hub dataset id, with the fields a task needs named in the config.

Every task that reads user data goes through :func:`load_table`, so that every format works for
every task and every problem gets the same kind of message: the file (or id), what is wrong, and
the fields the data does have.

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.jsonl").write_text(json.dumps({"text": "good", "label": "pos"}) + "\\n")
    >>> table = load_table(TableSource(path=str(d / "train.jsonl")), "data.train", ["text", "label"])
    >>> table.num_rows, table.column_names
    (1, ['text', 'label'])
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from distillery.configbase import StrictModel
from distillery.errors import ConfigError, DataNotFoundError

# file suffix -> the `datasets` builder that reads it
FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


class TableSource(StrictModel):
    """Where a table of examples comes from: a file, files (a glob), a folder written by
    ``datasets.Dataset.save_to_disk``, or a hub dataset id."""

    path: str | None = Field(
        None,
        description="a .jsonl/.json/.csv/.tsv/.parquet/.txt file, a glob of them, or a save_to_disk folder",
    )
    hub: str | None = Field(None, description="a Hugging Face hub dataset id (downloads: needs the network)")
    format: Literal["auto", "json", "csv", "parquet", "text", "disk"] = Field(
        "auto", description="how to read `path` (auto: from the suffix; a folder: save_to_disk)"
    )
    split: str = Field("train", description="the split of a hub dataset or of a saved DatasetDict")
    streaming: bool = Field(False, description="read lazily, for data that does not fit in memory")

    @model_validator(mode="after")
    def _one_source(self) -> TableSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local file or folder) or hub (a dataset id)")
        return self

    def describe(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"


def tables_cache() -> Path:
    """Where ``datasets`` keeps the Arrow copies of files it has read: beside distillery's other
    caches (``$DISTILLERY_CACHE/datasets``, default ``~/.cache/distillery/datasets``)."""
    env = os.environ.get("DISTILLERY_CACHE")
    root = (
        Path(env).expanduser()
        if env
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery"
    )
    return root / "datasets"


def _files(pattern: str) -> list[str]:
    if any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern] if Path(pattern).exists() else []


def _format_of(source: TableSource, files: list[str], field: str) -> str:
    if source.format != "auto":
        return source.format
    if len(files) == 1 and Path(files[0]).is_dir():
        return "disk"
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"{field}.path {source.path}: cannot tell the format from the file name(s) "
            f"{', '.join(Path(f).name for f in files[:3])}; use one of {', '.join(sorted(FORMATS))} or set "
            f"{field}.format to one of json, csv, parquet, text, disk"
        )
    return kinds.pop()


def load_table(
    source: TableSource, field: str, required: list[str] | None = None, text: list[str] | None = None
) -> Any:
    """The table ``source`` names, as a ``datasets.Dataset`` (``IterableDataset`` when streaming).

    Args:
        source: where the data is.
        field: the config section of ``source`` (``data.train``), for messages.
        required: fields every row must have; a missing one is a ConfigError listing the fields found.
        text: fields that hold text: a CSV reads them as written (``007`` stays ``"007"``, not the
            number 7).

    Raises:
        DataNotFoundError: no file matches, or the hub dataset cannot be reached.
        ConfigError: an empty or unreadable file, an unknown format, or a missing field.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    cache = str(tables_cache())
    if source.hub is not None:
        try:
            table = datasets.load_dataset(
                source.hub, split=source.split, streaming=source.streaming, cache_dir=cache
            )
        except Exception as exc:  # the hub raises many types: offline, unknown id, gated...
            raise DataNotFoundError(
                f"{field}.hub {source.hub!r} could not be loaded ({type(exc).__name__}: {exc}); check the id "
                "and the network, or download it once and give its folder as path"
            ) from None
        return _check_fields(table, required, field, source)
    files = _files(source.path)
    if not files:
        where = "" if Path(source.path).expanduser().is_absolute() else f" in {Path.cwd()}"
        raise DataNotFoundError(
            f"{field}.path {source.path} does not exist{where} (no file matches); check the path (a relative "
            "path is read from the working directory: run from the folder the config's paths start from, "
            "or give an absolute path)"
        )
    kind = _format_of(source, files, field)
    if kind == "disk":
        try:
            table = datasets.load_from_disk(files[0])
        except Exception as exc:
            raise ConfigError(
                f"{field}.path {files[0]} is not a folder written by datasets' save_to_disk ({exc})"
            ) from None
        if isinstance(table, datasets.DatasetDict):
            if source.split not in table:
                raise ConfigError(
                    f"{field}.split={source.split!r} is not a split of {files[0]}; it has {', '.join(table)}"
                )
            table = table[source.split]
        if source.streaming:
            table = table.to_iterable_dataset()
        return _check_fields(table, required, field, source)
    empty = [f for f in files if Path(f).is_file() and Path(f).stat().st_size == 0]
    if empty:
        raise ConfigError(f"{field}.path {empty[0]} is empty; it must hold at least one example")
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        kwargs["converters"] = {name: str for name in text or []}  # no type guessing for text
        if all(f.endswith(".tsv") for f in files):
            kwargs["delimiter"] = "\t"
    try:
        table = datasets.load_dataset(
            kind, data_files=files, split="train", streaming=source.streaming, cache_dir=cache, **kwargs
        )
    except Exception as exc:  # pyarrow and the builders raise many types on malformed files
        raise ConfigError(
            f"{field}.path {source.path} could not be read as {kind} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file"
        ) from None
    return _check_fields(table, required, field, source)


def _check_fields(table: Any, required: list[str] | None, field: str, source: TableSource) -> Any:
    names = list(table.column_names or []) if table.column_names is not None else None
    if names is None:  # a streaming table learns its fields from the first row
        first = next(iter(table), None)
        names = [] if first is None else list(first)
    missing = [name for name in (required or []) if name not in names]
    if missing:
        raise ConfigError(
            f"{field}: {source.describe()} has no field {', '.join(repr(m) for m in missing)}; its fields are "
            f"{', '.join(names) if names else '(none)'}; name the right one in the config"
        )
    if not source.streaming and table.num_rows == 0:
        raise ConfigError(f"{field}: {source.describe()} holds no examples")
    return table


__all__ = ["FORMATS", "TableSource", "load_table", "tables_cache"]
