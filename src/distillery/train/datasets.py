"""What :func:`distillery.train.fit` accepts as a training set, and the batches it draws from it.

Three protocols, tried in this order:

1. **get_batch**: ``len(ds)`` and ``ds.get_batch(indices [B]) -> dict of tensors`` (distillery's own
   datasets: :class:`~distillery.data.ArrayDataset`, :class:`~distillery.data.text.TokenDataset`).
2. **Hugging Face** ``datasets.Dataset`` (map-style, Arrow-backed): the rows of a batch are read in
   one call, ``ds[indices]``. Without a ``collate_fn``, a dataset without a format is read in the
   ``torch`` format (one tensor per numeric column; text columns stay lists of strings), and a
   dataset with a format (``with_format``, ``set_transform``) as that format gives it, numeric columns
   turned into tensors. With a ``collate_fn``, it gets the batch's rows as a list of dicts in the
   dataset's own format (as a ``DataLoader`` would: e.g. ``DataCollatorWithPadding(tokenizer)``).
3. **map-style** ``torch.utils.data.Dataset`` (anything with ``__len__`` and ``__getitem__``): the
   batch is ``collate_fn([ds[i] for i in indices])``, default ``torch.utils.data.default_collate``.
   Items may be dicts of tensors / numbers, or ``(x, y)`` pairs, which become ``{"x": ..., "y": ...}``
   (the keys of :class:`~distillery.models.adapters.ClassifierAdapter`).

For 2 and 3 the batch also gets ``"index"`` (the examples' positions in the dataset, the stable ids
per-sample teachers such as PS-KD key on) unless it has one. Iterable datasets are refused: the loop
reads its batches by position from the seeded :class:`~distillery.train.batches.BatchPlan`, which is
what makes runs reproducible and resumption exact.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distillery.capture import unwrap_model
from distillery.errors import ConfigError
from distillery.models.hf import HFCausalLMAdapter, HFSequenceClassifierAdapter

INDEX_KEY = "index"
PROTOCOLS = (
    "an object with __len__ and get_batch(indices) -> dict of tensors (distillery's datasets); "
    "a map-style torch.utils.data.Dataset (__len__ and __getitem__; items: dicts of tensors or numbers, "
    "or (x, y) pairs), with an optional collate_fn; or a Hugging Face datasets.Dataset"
)


class TrainSetError(ConfigError, TypeError):
    """``fit`` was given a training set that fits none of its protocols (or a batch it cannot use).

    A :class:`~distillery.errors.ConfigError` (the CLI prints it and exits with code 2) and a
    ``TypeError`` (what Python code expects of a wrong argument type)."""


def _is_hf_dataset(obj: Any, name: str = "Dataset") -> bool:
    """Whether ``obj`` is a ``datasets.<name>``, without importing ``datasets`` (an object can only be
    one if the module is loaded already)."""
    module = sys.modules.get("datasets")
    cls = getattr(module, name, None) if module is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


class BatchSource:
    """The training set as the loop uses it: ``len(source)`` and ``source.get_batch(indices)``."""

    kind = "get_batch"

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: Tensor) -> dict[str, Any]:
        return self.dataset.get_batch(indices)


class MapStyleSource(BatchSource):
    """``collate_fn([ds[i] for i in indices])`` for a map-style dataset, as a dict batch."""

    kind = "map-style Dataset"

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        super().__init__(dataset)
        self.collate_fn = collate_fn

    def get_batch(self, indices: Tensor) -> dict[str, Any]:
        positions = indices.reshape(-1).tolist()
        items = [self.dataset[i] for i in positions]
        collate = self.collate_fn
        if collate is None:
            from torch.utils.data import default_collate

            collate = default_collate
        try:
            batch = collate(items)
        except (TypeError, RuntimeError) as exc:
            if self.collate_fn is not None:
                raise
            raise TrainSetError(
                f"fit: default_collate cannot stack the items of the training set ({type(items[0]).__name__}: "
                f"{exc}); items must be dicts of tensors or numbers of one shape, or (x, y) pairs. Pass "
                "collate_fn=... to build batches of other items (e.g. padding sequences of different lengths)"
            ) from None
        return _with_index(_as_dict(batch, "the collated batch"), indices)


class HFDatasetSource(BatchSource):
    """Batches of a Hugging Face ``datasets.Dataset``: ``ds[indices]``, columns as tensors."""

    kind = "datasets.Dataset"

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        fmt = dataset.format
        if collate_fn is None and fmt.get("type") is None:  # plain Arrow rows -> tensors, no copy
            dataset = dataset.with_format(
                "torch", columns=fmt.get("columns"), output_all_columns=fmt.get("output_all_columns", False)
            )
        super().__init__(dataset)
        self.collate_fn = collate_fn

    def get_batch(self, indices: Tensor) -> dict[str, Any]:
        positions = indices.reshape(-1).tolist()
        columns = self.dataset[positions]  # {column: B values}
        if self.collate_fn is not None:
            rows = [{k: v[j] for k, v in columns.items()} for j in range(len(positions))]
            return _with_index(_as_dict(self.collate_fn(rows), "the collated batch"), indices)
        return _with_index({k: _column_tensor(k, v) for k, v in columns.items()}, indices)


def _column_tensor(name: str, values: Any) -> Any:
    """A column of a batch as one tensor; a column of strings stays a list; ragged rows are an error."""
    if isinstance(values, Tensor):
        return values
    if not isinstance(values, (list, tuple)):  # numpy, pandas, ...
        try:
            return torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            return values
    if not values or isinstance(values[0], (str, bytes)) or values[0] is None:
        return list(values)
    try:
        if isinstance(values[0], Tensor):
            return torch.stack(list(values))
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        pass
    raise TrainSetError(
        f"fit: column {name!r} of the datasets.Dataset holds rows of different lengths, which do not stack "
        "into one tensor; pass collate_fn=... to pad them (e.g. transformers.DataCollatorWithPadding"
        "(tokenizer)), or pad when tokenizing (padding='max_length')"
    )


def _as_dict(batch: Any, what: str) -> dict[str, Any]:
    """A batch as a dict: a mapping as it is, an ``(x, y)`` pair as ``{"x": x, "y": y}``."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 2:
        return {"x": batch[0], "y": batch[1]}
    size = f" of {len(batch)}" if isinstance(batch, Sequence) else ""
    raise TrainSetError(
        f"fit: {what} is a {type(batch).__name__}{size}; it must be a dict of tensors (keys read by the "
        "adapter, e.g. x and y for ClassifierAdapter) or an (x, y) pair"
    )


def _with_index(batch: dict[str, Any], indices: Tensor) -> dict[str, Any]:
    if INDEX_KEY not in batch:
        batch[INDEX_KEY] = indices.reshape(-1).clone()
    return batch


def batch_source(train_set: Any, collate_fn: Callable[[list[Any]], Any] | None = None) -> BatchSource:
    """``train_set`` as a :class:`BatchSource` (see the module docstring for the protocols).

    Raises:
        TrainSetError: ``train_set`` fits no protocol (the message names them and what it lacks), or a
            ``collate_fn`` is given for a dataset that builds its batches itself.
    """
    if isinstance(train_set, BatchSource):
        return train_set
    what = type(train_set).__name__
    if callable(getattr(train_set, "get_batch", None)) and hasattr(train_set, "__len__"):
        if collate_fn is not None:
            raise TrainSetError(
                f"fit: collate_fn is for map-style datasets, but the {what} builds its own batches "
                "(get_batch); drop collate_fn, or pass a dataset of items"
            )
        return BatchSource(train_set)
    if _is_hf_dataset(train_set, "DatasetDict"):
        raise TrainSetError(
            f"fit: train_set is a datasets.DatasetDict of splits {sorted(train_set)}; pass one split, e.g. "
            "train_set=ds['train']"
        )
    iterable = _is_hf_dataset(train_set, "IterableDataset") or isinstance(
        train_set, torch.utils.data.IterableDataset
    )
    if iterable:
        raise TrainSetError(
            f"fit: train_set is an iterable dataset ({what}), which cannot be read by position; fit draws "
            "every step's examples by index from a seeded plan (reproducible runs, exact resumption). Pass "
            f"a map-style dataset instead. It accepts {PROTOCOLS}"
        )
    if _is_hf_dataset(train_set):
        return HFDatasetSource(train_set, collate_fn)
    if isinstance(train_set, Mapping):
        raise TrainSetError(
            f"fit: train_set is a {what} (a mapping, not a dataset of examples); for a dict of tensors use "
            "torch.utils.data.TensorDataset(x, y) or distillery.data.ArrayDataset(x, y, index). fit accepts "
            f"{PROTOCOLS}"
        )
    lacks = [m for m in ("__len__", "__getitem__") if not hasattr(train_set, m)]
    if lacks:
        missing = " and ".join(lacks)
        raise TrainSetError(
            f"fit: train_set (a {what}) fits none of the dataset protocols: it has no get_batch, and no "
            f"{missing} for map-style access. fit accepts {PROTOCOLS}"
        )
    return MapStyleSource(train_set, collate_fn)


# ----------------------------------------------------------------------------------------------------
# Batch keys against the adapter
# ----------------------------------------------------------------------------------------------------


def adapter_keys(adapter: Any) -> tuple[str, ...]:
    """The batch keys ``adapter`` needs: its ``batch_keys`` if it declares them, else its ``input_key``
    and ``target_key`` attributes (the Hugging Face adapters read ``input_ids`` and ``labels``)."""
    declared = getattr(adapter, "batch_keys", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(adapter, (HFSequenceClassifierAdapter, HFCausalLMAdapter)):
        return ("input_ids", adapter.target_key)
    return tuple(k for k in (getattr(adapter, "input_key", None), getattr(adapter, "target_key", None)) if k)


def _hf_adapter_for(model: Any) -> str | None:
    """The HF adapter a ``transformers`` model calls for (by its class name), if any."""
    if model is None:
        return None
    raw = unwrap_model(model)
    if not type(raw).__module__.startswith("transformers."):
        return None
    name = type(raw).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "HFCausalLMAdapter"
    if name.endswith("ForSequenceClassification"):
        return "HFSequenceClassifierAdapter"
    return None


def adapter_hint(model: Any, keys: set[str], adapter: Any = None) -> str:
    """Which adapter fits ``model`` and batches with ``keys``, as a sentence (or, when ``adapter``
    already is the one the model needs, which keys the batches must hold)."""
    current = type(adapter).__name__ if adapter is not None else None
    hf = _hf_adapter_for(model)
    if hf is not None and hf != current:
        return (
            f"the model is a Hugging Face {type(unwrap_model(model)).__name__}: pass adapter={hf}() (from "
            "distillery.models.hf), which reads input_ids, attention_mask (optional) and labels"
        )
    if hf is not None or current in ("HFSequenceClassifierAdapter", "HFCausalLMAdapter"):
        return (
            "a Hugging Face model needs tokenized batches: input_ids, attention_mask (optional) and labels "
            "(e.g. a datasets.Dataset mapped through its tokenizer)"
        )
    if {"input_ids", "labels"} <= keys:
        return (
            "the batches look tokenized: pass adapter=HFSequenceClassifierAdapter() for a sequence "
            "classifier or adapter=HFCausalLMAdapter() for a causal LM (both from distillery.models.hf; "
            "they read input_ids, attention_mask and labels)"
        )
    if {"x", "y"} <= keys and current != "ClassifierAdapter":
        return "pass adapter=ClassifierAdapter() (distillery.models.adapters), which reads x and y"
    return (
        "give the batches the keys the adapter reads, or an adapter that reads their keys (any object with "
        "forward(model, batch) and rows(batch))"
    )


def check_batch_keys(batch: Mapping[str, Any], adapter: Any, model: Any, who: str = "adapter") -> None:
    """Refuse a batch that lacks a key ``adapter`` reads, naming the adapter that fits (once, at the
    first batch of a run: it is the difference between a ``KeyError('y')`` and a fix).

    Raises:
        ConfigError: naming the batch's keys, the adapter's, and the adapter to use instead.
    """
    needed = adapter_keys(adapter)
    missing = [k for k in needed if k not in batch]
    if not missing:
        return
    keys = set(batch)
    raise ConfigError(
        f"fit: the batches of the training set have the keys {sorted(keys)}, but the {who} "
        f"{type(adapter).__name__} reads {', '.join(needed)} (missing: {', '.join(missing)}); "
        + adapter_hint(model, keys, adapter)
    )


__all__ = [
    "PROTOCOLS",
    "BatchSource",
    "TrainSetError",
    "adapter_hint",
    "adapter_keys",
    "batch_source",
    "check_batch_keys",
]
