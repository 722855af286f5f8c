"""Classification on the user's own files (``data: {name: files, ...}``): a table of examples with a
text field or a features field (numbers) and a label field, in any format :func:`load_table` reads
(CSV/TSV, JSONL, Parquet, a ``save_to_disk`` folder, a hub dataset id).

How a run uses the files:

- ``train``: the training pool. The ``test`` split is another file, or carved from the pool once
  (class-balanced, ``split_seed``: the same for every run seed). The ``validation`` split is another
  file, or carved from the pool for each run seed, like the built-in datasets
  (:mod:`distillery.data.splits`): the labelled split (``labelled``) and the transfer split
  (``transfer``, labels hidden) come from the rest. An ``unlabelled`` file adds transfer candidates
  (its labels, if any, are never read). Test rows are never in another split.
- Labels: the class names are ``labels`` (in that order; any other value is an error naming the
  row), else the sorted distinct values of the training file (a ``ClassLabel`` column's names).
- Features (``features_field``): a list of numbers per row (nested lists keep their shape), or a
  list of columns holding one number each (the CSV layout); ``input_shape`` reshapes each row
  (``[1, 8, 8]`` for a CNN). The rows become one float tensor ``x [N, *input_shape]``.
- Text (``text_field``): tokenised once per *tokenizer*, not per model: a model built from a config
  trains its tokenizer on the training pool's texts (cached), a pretrained model brings its own.
  Each tokenizer's ids go under their own batch key (:class:`KeyedDataset`); ids are ``int64`` with
  :data:`TEXT_PAD` (-1) after the end of a text, so one tensor says both the ids and the mask.

The teacher cache key includes :meth:`UserData.fingerprint`, a SHA-256 of the files' contents: a
changed file never reuses a teacher trained on the old one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor

from distillery.configbase import StrictModel
from distillery.data.base import UNLABELLED, ArrayDataset, ClassificationData, stratified_sample
from distillery.data.noise import LabelNoiseConfig
from distillery.data.splits import draw_splits, validation_count
from distillery.data.tables import TableSource, load_table
from distillery.data.text.tokenizer import TOKENIZER_FILES, train_tokenizer
from distillery.errors import ConfigError
from distillery.fileio import is_local_source

TEXT_PAD = -1  # token id of the positions after a text's end (models mask them out)


def _source(value: Any) -> Any:
    """``train: data/train.csv`` is short for ``train: {path: data/train.csv}``."""
    return {"path": value} if isinstance(value, str) else value


class FilesDataConfig(StrictModel):
    """A classification dataset from the user's files; see the module docstring."""

    name: Literal["files"] = "files"
    train: TableSource = Field(description="the training table (a path, or {path|hub, format, split})")
    test: TableSource | int | float = Field(
        0.2,
        description="the test table, or how much of the training table to hold out as test (a fraction "
        "< 1 or a count; class-balanced, fixed by split_seed for every run seed); evaluated once, at the end",
    )
    validation: TableSource | int | float = Field(
        0.1,
        description="the validation table, or how much of the training pool each run seed carves for "
        "evaluation during training (a fraction < 1 or a count, class-balanced; 0 = none)",
    )
    unlabelled: TableSource | None = Field(
        None, description="extra unlabelled examples for the transfer split (their labels are never read)"
    )
    text_field: str | None = Field(None, description="the field holding each example's text")
    features_field: str | list[str] | None = Field(
        None,
        description="the field holding each example's numbers (a list per row), or a list of fields "
        "holding one number each",
    )
    input_shape: list[PositiveInt] | None = Field(
        None, description="features: the shape of one example (e.g. [1, 8, 8] for a CNN); null: as stored"
    )
    label_field: str = Field("label", description="the field holding each example's label")
    labels: list[str | int] | None = Field(
        None,
        min_length=2,
        description="the class names in order; a label outside them is an error. null: the sorted "
        "distinct labels of the training table",
    )
    max_length: int = Field(128, ge=1, description="text: tokens kept per example (longer texts are cut)")
    labelled: int | None = Field(
        None,
        ge=1,
        description="labelled training examples per run (class-balanced); null = the pool minus validation",
    )
    transfer: int | None = Field(
        0,
        ge=0,
        description="unlabelled transfer examples, from the rest of the pool and the unlabelled table; "
        "null = all of them (the default when `unlabelled` is given)",
    )
    split_seed: int = Field(0, description="seed of the fixed train/test split (independent of run seeds)")
    label_noise: LabelNoiseConfig | None = Field(
        None, description="corrupt a fraction of the labelled split's labels (test labels stay clean)"
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("train", "test", "validation", "unlabelled"):
            if key in data:
                data[key] = _source(data[key])
        if data.get("unlabelled") is not None and "transfer" not in data:
            data["transfer"] = None  # an unlabelled table is there to be used
        return data

    @field_validator("test", "validation")
    @classmethod
    def _fraction_below_one(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError(
                f"a fraction of the training table must be in [0, 1) (or give a count); got {value}"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a count must be >= 0; got {value}")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str | int] | None) -> list[str | int] | None:
        if labels is not None:
            repeated = sorted({str(v) for v in labels if [str(w) for w in labels].count(str(v)) > 1})
            if repeated:
                raise ValueError(f"class names must be distinct; repeated: {', '.join(repeated)}")
        return labels

    @model_validator(mode="after")
    def _one_input(self) -> FilesDataConfig:
        if (self.text_field is None) == (self.features_field is None):
            raise ValueError(
                "give exactly one of data.text_field (the field holding text) or data.features_field "
                f"(the field holding numbers); got {'both' if self.text_field else 'neither'}"
            )
        if self.input_shape is not None and self.features_field is None:
            raise ValueError("data.input_shape applies to data.features_field only (text has no shape)")
        if isinstance(self.test, (int, float)) and not isinstance(self.test, bool) and self.test == 0:
            raise ValueError("data.test=0 leaves no test split; give a fraction, a count or a test table")
        return self

    @property
    def input_kind(self) -> Literal["text", "features"]:
        return "text" if self.text_field is not None else "features"

    def title(self) -> str:
        """The dataset's name in reports: the hub id, else the training file's folder name."""
        if self.train.hub is not None:
            return self.train.hub
        path = Path(self.train.path)
        return path.name if path.is_dir() else (path.parent.name or path.stem)


# ----------------------------------------------------------------------------------------------------
# In-memory splits with several inputs per row
# ----------------------------------------------------------------------------------------------------


@dataclass
class KeyedDataset(ArrayDataset):
    """An :class:`ArrayDataset` whose rows carry further inputs under their own batch keys: the token ids
    of another tokenizer for the same texts (``extra = {"x_teacher": [N, L']}``)."""

    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, value in self.extra.items():
            if len(value) != len(self.y):
                raise ValueError(f"extra input {key!r} has {len(value)} rows, the dataset {len(self.y)}")

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        return {**super().get_batch(indices), **{k: v[indices] for k, v in self.extra.items()}}

    def subset(self, positions: Tensor) -> KeyedDataset:
        extra = {k: v[positions] for k, v in self.extra.items()}
        return KeyedDataset(self.x[positions], self.y[positions], self.index[positions], extra)

    def without_labels(self) -> KeyedDataset:
        return KeyedDataset(self.x, torch.full_like(self.y, UNLABELLED), self.index, dict(self.extra))

    @staticmethod
    def concat(*parts: ArrayDataset) -> KeyedDataset:
        parts = tuple(p for p in parts if len(p) > 0)
        keys = list(getattr(parts[0], "extra", {}))
        return KeyedDataset(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.index for p in parts]),
            {k: torch.cat([p.extra[k] for p in parts]) for k in keys},
        )


@dataclass
class UserClassificationData(ClassificationData):
    """The splits of one run on the user's files; text data also carries each batch key's tokenizer."""

    input_kind: str = "features"
    tokenizers: dict[str, Any] = field(default_factory=dict)  # batch key -> tokenizer (text data)

    def distillation_set(self) -> KeyedDataset:
        return KeyedDataset.concat(self.labelled, self.transfer)

    def text_inputs(self, key: str = "x") -> dict[str, int]:
        """``{"vocab_size", "pad_token_id"}`` of the tokenizer behind batch key ``key`` (empty: not text)."""
        tok = self.tokenizers.get(key)
        if tok is None:
            return {}
        return {"vocab_size": len(tok), "pad_token_id": padding_id(tok)}

    def describe(self) -> str:
        text = super().describe()
        if self.input_kind != "text":
            return text
        head = text.rsplit("; input ", 1)[0]
        return f"{head}; text of up to {self.input_shape[0]} tokens, {self.num_classes} classes"


# ----------------------------------------------------------------------------------------------------
# Reading the tables
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """One table's examples: ``inputs`` (texts, or a float tensor ``[N, *shape]``) and class ids."""

    inputs: list[str] | Tensor
    labels: Tensor | None  # None: an unlabelled table

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, positions: Tensor) -> _Rows:
        inputs = (
            self.inputs[positions]
            if isinstance(self.inputs, Tensor)
            else [self.inputs[i] for i in positions.tolist()]
        )
        return _Rows(inputs, None if self.labels is None else self.labels[positions])


def _columns(table: Any, names: list[str]) -> dict[str, list]:
    import datasets

    if isinstance(table, datasets.Dataset):
        return table.select_columns(names).to_dict()
    out: dict[str, list] = {name: [] for name in names}
    for row in table:  # a streaming table
        for name in names:
            out[name].append(row.get(name))
    return out


def _missing(value: Any) -> bool:
    """An empty cell: None, or NaN (how a CSV reader fills an empty cell of a number column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(values: list, field: str, where: str, column: str) -> list[str]:
    texts = []
    for i, value in enumerate(values):
        if _missing(value):
            raise ConfigError(
                f"{field}: row {i + 1} of {where} has no {column!r} (empty); every row needs a text"
            )
        texts.append(value if isinstance(value, str) else str(value))
    return texts


def _as_features(rows: list, field: str, where: str, column: str) -> Tensor:
    """Rows of numbers (lists, nested lists, or one number) as one float tensor ``[N, *shape]``."""
    try:
        x = torch.tensor(rows, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        x = None
    if x is not None and x.dim() == 1:  # one number per row
        x = x.unsqueeze(1)
    if x is None:  # find the first row that differs, for the message
        first = None
        for i, row in enumerate(rows):
            if row is None:
                raise ConfigError(
                    f"{field}: row {i + 1} of {where} has no {column!r} (empty); every row needs numbers"
                )
            try:
                t = torch.tensor(row, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ConfigError(
                    f"{field}: row {i + 1} of {where} has {column!r} = {str(row)[:60]!r}, not a list of numbers"
                ) from None
            t = t.reshape(1) if t.dim() == 0 else t
            if first is None:
                first = t.shape
            elif t.shape != first:
                raise ConfigError(
                    f"{field}: row {i + 1} of {where} has {column!r} of shape {list(t.shape)}, row 1 has "
                    f"{list(first)}; every row needs the same number of values"
                )
        raise ConfigError(f"{field}: {where}: {column!r} is not a table of numbers")
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ConfigError(f"{field}: row {i + 1} of {where} has a NaN or infinite value in {column!r}")
    return x


def _label_names(values: list, table: Any, label_field: str) -> list:
    """Label values as they are, or a ``ClassLabel`` column's ints as its names."""
    feature = (getattr(table, "features", None) or {}).get(label_field)
    names = getattr(feature, "names", None)
    if names is None:
        return [None if _missing(v) else v for v in values]
    return [None if v is None or v < 0 else names[v] for v in values]  # ClassLabel: -1 = no label


def _sorted_classes(values: list) -> list[str]:
    distinct = {v for v in values if v is not None}
    if distinct and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        ordered = sorted(distinct)
    else:
        ordered = sorted(distinct, key=str)
    names = list(dict.fromkeys(str(v) for v in ordered))
    return names


def _file_sha256(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def source_sha256(source: TableSource, table: Any = None) -> str:
    """SHA-256 of a table source's contents (a file's bytes; every file of a glob or folder with its
    relative name), not of its path; for a hub dataset, its id, split and the ``datasets`` fingerprint
    of the loaded table."""
    h = hashlib.sha256()
    if source.hub is not None:
        h.update(f"hub:{source.hub}:{source.split}:{getattr(table, '_fingerprint', '')}".encode())
        return h.hexdigest()
    pattern = source.path
    if any(ch in pattern for ch in "*?["):
        import glob

        files = [Path(p) for p in sorted(glob.glob(pattern))]
        root = None
    else:
        root = Path(pattern)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in files:  # a folder's or glob's files by name; a single file by its contents alone
        if root is not None and root.is_dir():
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
        elif root is None:
            h.update(path.name.encode() + b"\0")
        _file_sha256(path, h)
        h.update(b"\0")
    h.update(f"{source.format}:{source.split}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


def padding_id(tokenizer: Any) -> int:
    """The id a model sees at padded positions (masked out): the tokenizer's pad, end or unknown token."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def load_model_tokenizer(source: str, field: str) -> Any:
    """The tokenizer saved with a pretrained text classifier (a directory or a hub id).

    Raises:
        ConfigError: a local directory without tokenizer files (or damaged ones), or a hub id that
            does not load.
    """
    from transformers import AutoTokenizer

    local = is_local_source(source)
    if local:
        path = Path(source).expanduser()
        if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(
                f"{field}={source}: a text classifier needs its tokenizer, but the directory holds no "
                f"tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save it there with "
                "tokenizer.save_pretrained(<directory>)"
            )
        source = str(path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        where = (
            "its tokenizer files are damaged or incomplete"
            if local
            else "it could not be loaded from the hub"
        )
        raise ConfigError(f"{field}={source}: cannot load the tokenizer: {where} ({reason})") from None


def encode_texts(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's own special tokens), at most ``max_length``; a text
    that gives no token at all gets one (the padding id) so that every row has a position to read."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        max_length = limit
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    fallback = [padding_id(tokenizer)]
    return [row if row else fallback for row in ids]


def pad_ids(rows: Sequence[Sequence[int]], width: int) -> Tensor:
    """``[N, width]`` int64 ids, :data:`TEXT_PAD` after each row's end."""
    out = torch.full((len(rows), width), TEXT_PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------
# The user's data for one run
# ----------------------------------------------------------------------------------------------------


class UserData:
    """The tables of a ``files`` data config, read and checked once per run; :meth:`splits` draws a
    run seed's splits from them (cheap). Text must be encoded first (:meth:`encode`)."""

    def __init__(self, cfg: FilesDataConfig) -> None:
        self.cfg = cfg
        self.hashes: dict[str, str] = {}
        train, train_table = self._read(cfg.train, "data.train", labelled=True)
        self.class_names = self._classes(train, train_table)
        pool = self._rows(train, train_table, "data.train", cfg.train)
        if isinstance(cfg.test, TableSource):
            test_raw, test_table = self._read(cfg.test, "data.test", labelled=True)
            self.test = self._rows(test_raw, test_table, "data.test", cfg.test)
            self.pool = pool
        else:
            n = len(pool)
            n_test = validation_count(cfg.test, n)
            if not 1 <= n_test < n:
                raise ConfigError(
                    f"data.test={cfg.test} holds out {n_test} of the {n} rows of {cfg.train.describe()}; it must "
                    "leave at least one row for training and one for testing"
                )
            g = torch.Generator().manual_seed(cfg.split_seed)
            test_pos = stratified_sample(pool.labels, n_test, g)
            keep = torch.ones(n, dtype=torch.bool)
            keep[test_pos] = False
            self.test, self.pool = pool.take(test_pos), pool.take(torch.nonzero(keep).squeeze(1))
        self.validation: _Rows | None = None
        if isinstance(cfg.validation, TableSource):
            val_raw, val_table = self._read(cfg.validation, "data.validation", labelled=True)
            self.validation = self._rows(val_raw, val_table, "data.validation", cfg.validation)
        self.unlabelled: _Rows | None = None
        if cfg.unlabelled is not None:
            raw, table = self._read(cfg.unlabelled, "data.unlabelled", labelled=False)
            self.unlabelled = self._rows(raw, table, "data.unlabelled", cfg.unlabelled)
        self._check_shapes()
        self.encoded: dict[str, dict[str, Tensor]] = {}  # batch key -> table -> ids
        self.tokenizers: dict[str, Any] = {}

    # ---- reading ----------------------------------------------------------------------------------

    def _input_fields(self) -> list[str]:
        spec = self.cfg.text_field or self.cfg.features_field
        return list(spec) if isinstance(spec, list) else [spec]

    def _read(self, source: TableSource, field: str, labelled: bool) -> tuple[dict[str, list], Any]:
        required = self._input_fields() + ([self.cfg.label_field] if labelled else [])
        text = list(self.cfg.text_field) if isinstance(self.cfg.text_field, list) else [self.cfg.text_field]
        table = load_table(source, field, required, text=[t for t in text if t is not None])
        columns = _columns(table, required)
        if not columns[required[0]]:
            raise ConfigError(f"{field}: {source.describe()} holds no examples")
        self.hashes[field.removeprefix("data.")] = source_sha256(source, table)
        return columns, table

    def _classes(self, columns: dict[str, list], table: Any) -> tuple[str, ...]:
        if self.cfg.labels is not None:
            return tuple(str(v) for v in self.cfg.labels)
        values = _label_names(columns[self.cfg.label_field], table, self.cfg.label_field)
        names = _sorted_classes(values)
        if len(names) < 2:
            raise ConfigError(
                f"data.train: {self.cfg.train.describe()} has {len(names)} distinct label(s) in "
                f"{self.cfg.label_field!r} ({', '.join(names) or 'none'}); classification needs at least two"
            )
        return tuple(names)

    def _rows(self, columns: dict[str, list], table: Any, field: str, source: TableSource) -> _Rows:
        cfg, where = self.cfg, source.describe()
        if cfg.text_field is not None:
            inputs: list[str] | Tensor = _as_text(columns[cfg.text_field], field, where, cfg.text_field)
        elif isinstance(cfg.features_field, list):
            rows = [list(r) for r in zip(*(columns[c] for c in cfg.features_field))]
            inputs = _as_features(rows, field, where, ", ".join(cfg.features_field))
        else:
            inputs = _as_features(columns[cfg.features_field], field, where, cfg.features_field)
        labels = None
        if field != "data.unlabelled":
            labels = self._label_ids(
                _label_names(columns[cfg.label_field], table, cfg.label_field), field, where
            )
        return _Rows(inputs, labels)

    def _label_ids(self, values: list, field: str, where: str) -> Tensor:
        lookup = {name: k for k, name in enumerate(self.class_names)}
        ids = []
        for i, value in enumerate(values):
            k = None if value is None else lookup.get(str(value))
            if k is None:
                if value is None:
                    problem = f"has no label in {self.cfg.label_field!r} (empty)"
                else:
                    problem = f"has label {value!r} in {self.cfg.label_field!r}"
                known = (
                    f"not one of data.labels ({', '.join(self.class_names)})"
                    if self.cfg.labels is not None
                    else f"not a label of the training table ({', '.join(self.class_names)}); list every "
                    "class in data.labels"
                )
                raise ConfigError(f"{field}: row {i + 1} of {where} {problem}, {known}")
            ids.append(k)
        return torch.tensor(ids, dtype=torch.long)

    def _check_shapes(self) -> None:
        cfg = self.cfg
        if cfg.features_field is None:
            return
        shape = tuple(self.pool.inputs.shape[1:])
        for name in ("test", "validation", "unlabelled"):
            rows = getattr(self, name)
            if rows is not None and tuple(rows.inputs.shape[1:]) != shape:
                raise ConfigError(
                    f"data.{name}: its rows have {list(rows.inputs.shape[1:])} numbers, the training table's "
                    f"{list(shape)}; every table needs the same features"
                )
        if cfg.input_shape is not None:
            size = math.prod(shape)
            if math.prod(cfg.input_shape) != size:
                raise ConfigError(
                    f"data.input_shape={cfg.input_shape} holds {math.prod(cfg.input_shape)} values, but each row of "
                    f"{cfg.train.describe()} has {size} (shape {list(shape)})"
                )
            for name in ("pool", "test", "validation", "unlabelled"):
                rows = getattr(self, name)
                if rows is not None:
                    rows.inputs = rows.inputs.reshape(len(rows.inputs), *cfg.input_shape)

    # ---- text -------------------------------------------------------------------------------------

    def training_texts(self) -> list[str]:
        """The texts a tokenizer is trained on: the training pool (never the test rows)."""
        return list(self.pool.inputs) if self.cfg.text_field is not None else []

    def tokenizer(
        self,
        kind: str,
        vocab_size: int | None = None,
        pretrained: str | None = None,
        field: str = "model",
    ) -> Any:
        """A model's tokenizer: trained on :meth:`training_texts` (``kind`` bpe or byte, cached), or the
        one saved with a pretrained model (``kind="pretrained"``, ``pretrained``: its directory or id)."""
        if kind == "pretrained":
            return load_model_tokenizer(pretrained, field)
        return train_tokenizer(self.training_texts(), vocab_size, kind)

    def encode(self, tokenizers: Mapping[str, Any]) -> None:
        """Tokenise every table's texts once per tokenizer; ``tokenizers``: batch key -> tokenizer
        (``"x"`` is the student's). Each key's ids share one width (the longest text, at most max_length)."""
        tables = {name: getattr(self, name) for name in ("pool", "test", "validation", "unlabelled")}
        for key, tok in tokenizers.items():
            ids = {
                name: encode_texts(rows.inputs, tok, self.cfg.max_length)
                for name, rows in tables.items()
                if rows is not None
            }
            width = max(len(r) for rows in ids.values() for r in rows)
            self.encoded[key] = {name: pad_ids(rows, width) for name, rows in ids.items()}
            self.tokenizers[key] = tok

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of each table's contents (``train``, ``test``, ``validation``, ``unlabelled``)."""
        return dict(sorted(self.hashes.items()))

    # ---- splits -----------------------------------------------------------------------------------

    def _dataset(self, name: str, index: Tensor) -> KeyedDataset:
        rows = getattr(self, name)
        labels = rows.labels if rows.labels is not None else torch.full((len(rows),), UNLABELLED)
        if self.cfg.text_field is None:
            return KeyedDataset(rows.inputs, labels, index)
        if "x" not in self.encoded:
            raise ValueError("text data must be encoded first: UserData.encode({'x': tokenizer, ...})")
        extra = {k: v[name] for k, v in self.encoded.items() if k != "x"}
        return KeyedDataset(self.encoded["x"][name], labels, index, extra)

    def splits(self, seed: int) -> UserClassificationData:
        """Run ``seed``'s splits (see :func:`distillery.data.splits.draw_splits`); sample ids are unique
        over the pool, the unlabelled table, the validation table and the test split, in that order."""
        cfg = self.cfg
        n_pool, n_unl = len(self.pool), 0 if self.unlabelled is None else len(self.unlabelled)
        n_val = 0 if self.validation is None else len(self.validation)
        pool = self._dataset("pool", torch.arange(n_pool))
        unlabelled = (
            None if self.unlabelled is None else self._dataset("unlabelled", n_pool + torch.arange(n_unl))
        )
        drawn = draw_splits(
            pool,
            seed=seed,
            num_classes=len(self.class_names),
            name=cfg.train.describe(),
            validation=0 if isinstance(cfg.validation, TableSource) else cfg.validation,
            labelled=cfg.labelled,
            transfer=cfg.transfer,
            label_noise=cfg.label_noise,
            unlabelled=unlabelled,
        )
        validation = drawn.validation
        if self.validation is not None:
            validation = self._dataset("validation", n_pool + n_unl + torch.arange(n_val))
        offset = n_pool + n_unl + n_val
        test = self._dataset("test", offset + torch.arange(len(self.test)))
        return UserClassificationData(
            name=cfg.title(),
            labelled=drawn.labelled,
            clean_labels=drawn.clean_labels,
            transfer=drawn.transfer,
            validation=validation,
            test=test,
            input_shape=tuple(pool.x.shape[1:]),
            num_classes=len(self.class_names),
            class_names=self.class_names,
            input_kind=cfg.input_kind,
            tokenizers=dict(self.tokenizers),
        )


def load_user_data(
    cfg: FilesDataConfig, seed: int, tokenizers: Mapping[str, Any] | None = None
) -> UserClassificationData:
    """Read ``cfg``'s tables and draw run ``seed``'s splits. Text is tokenised with ``tokenizers``
    (batch key -> tokenizer; default: a byte-level BPE tokenizer trained on the pool's texts as ``x``)."""
    data = UserData(cfg)
    if cfg.text_field is not None:
        data.encode(tokenizers or {"x": data.tokenizer("bpe")})
    return data.splits(seed)


__all__ = [
    "TEXT_PAD",
    "FilesDataConfig",
    "KeyedDataset",
    "UserClassificationData",
    "UserData",
    "encode_texts",
    "load_model_tokenizer",
    "load_user_data",
    "pad_ids",
    "source_sha256",
]
