"""Prompt/response pairs and their JSONL file format.

One JSON object per line: ``{"prompt": str, "response": str}``. Other keys (an id, a source) are
allowed and ignored; blank lines are skipped. Errors name the file and the line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.errors import DataNotFoundError, DistilleryError


class DataFormatError(DistilleryError):
    """A data file exists but does not hold what its format promises (the message names the line)."""


@dataclass(frozen=True)
class PromptResponse:
    """One supervised example: the model reads ``prompt`` and is trained to produce ``response``."""

    prompt: str
    response: str


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "object"}


def read_records(path: str | Path, fields: Mapping[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line, each holding ``fields`` (name -> type).

    Other keys are kept as they are.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: a line is not JSON, not an object, lacks one of ``fields`` or holds a value of
            another type; or the file is not UTF-8 text. The message reads ``path:line: what is wrong``.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "rows.jsonl")
        ...     _ = open(p, "w").write('{"prompt": "1+1=", "n": 2}\\n')
        ...     read_records(p, {"prompt": str})
        [{'prompt': '1+1=', 'n': 2}]
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file")
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                rows.append(_parse_line(path, line_no, line, fields))
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return rows


def _parse_line(
    path: Path, line_no: int, line: str, fields: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataFormatError(
            f"{path}:{line_no}: expected an object with {', '.join(map(repr, fields))}, got {type(row).__name__}"
        )
    missing = [k for k in fields if k not in row]
    if missing:
        raise DataFormatError(
            f"{path}:{line_no}: missing key(s) {', '.join(map(repr, missing))} (the line has {sorted(row)})"
        )
    for key, kind in fields.items():
        if not isinstance(row[key], kind):
            kinds = (kind,) if isinstance(kind, type) else kind
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise DataFormatError(
                f"{path}:{line_no}: {key!r} must be a {expected}, got {type(row[key]).__name__}"
            )
    return row


def load_jsonl(path: str | Path) -> list[PromptResponse]:
    """Read prompt/response pairs from a JSONL file.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: a line is not JSON, not an object, lacks ``prompt``/``response``, or holds a
            non-string value; the message reads ``path:line: what is wrong``.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "pairs.jsonl")
        ...     write_jsonl(p, [PromptResponse("2+2=", "4")])
        ...     load_jsonl(p)
        [PromptResponse(prompt='2+2=', response='4')]
    """
    rows = read_records(path, {"prompt": str, "response": str})
    return [PromptResponse(row["prompt"], row["response"]) for row in rows]


def write_jsonl(path: str | Path, pairs: Iterable[PromptResponse]) -> None:
    """Write pairs one JSON object per line (UTF-8, non-ASCII kept as is)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(
                json.dumps({"prompt": pair.prompt, "response": pair.response}, ensure_ascii=False) + "\n"
            )
