"""Signals from the middle of a classifier, read by forward hooks, and the projectors that match them.

:class:`FeatureTap` wraps a model without changing it: while the model runs, the outputs of the
modules named by dotted path (``body.3``, ``layer2.0``) are recorded (:class:`distillery.capture.Capture`)
and, on the student side, passed through their projectors. :class:`TapAdapter` hands them to the
loss terms as ``ModelOutput.features`` under the names the terms look for. The exported student is
the wrapped model (``tap.model``): projectors are trained with the student but never saved with it
nor counted in its parameters.

Projectors are built from the shapes seen on an example batch (:func:`signal_shapes`) before
training starts, so the optimizer sees their parameters from the first step:

==========  =========================================================================
kind        maps the student's ``[B, ...]`` signal to the teacher's shape
==========  =========================================================================
linear      ``[B, F_s] -> [B, F_t]``; token states ``[B, L, H_s] -> [B, L, H_t]`` position by position; other
            shapes are flattened per sample first
conv1x1     ``[B, C_s, H, W] -> [B, C_t, H, W]`` (a 1x1 convolution, FitNets' regressor)
mlp         ``Linear -> ReLU -> Linear`` on flattened samples, hidden width ``max(F_s, F_t)``
auto        none when the shapes already match, else conv1x1 for maps of the same H x W, else linear
==========  =========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.capture import Capture, unwrap_model
from distillery.errors import ConfigError
from distillery.models.adapters import ClassifierAdapter, ModelOutput

TOKEN_MASK = "token_mask"  # the feature holding the [B, L] mask of real tokens (see losses.representation)


def _tensor_of(value: Any, path: str) -> Tensor:
    """The tensor a module returned (the first element of a tuple, as Hugging Face layers return)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise ConfigError(
        f"the module at {path!r} returned a {type(value).__name__}, not a tensor; name a module whose output "
        "is a tensor (e.g. a layer inside it)"
    )


def _slot(name: str) -> str:
    return name.replace(".", "_")


class FeatureTap(nn.Module):
    """``model`` plus the signals read from it on every forward pass, projected where asked.

    Args:
        model: the network (its forward and outputs are unchanged).
        signals: feature name -> dotted module path in ``model``.
        projectors: feature name -> module applied to that signal (student side); the others pass as
            they are.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> tap = FeatureTap(net, {"hid": "1"}, {"hid": nn.Linear(8, 5)})
        >>> logits = tap(torch.ones(2, 4))
        >>> logits.shape, tap.take_features()["hid"].shape
        (torch.Size([2, 3]), torch.Size([2, 5]))
    """

    def __init__(
        self, model: nn.Module, signals: Mapping[str, str], projectors: Mapping[str, nn.Module] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.signals = dict(signals)
        # ModuleDict keys cannot hold dots ("features.0"): stored as "features_0"
        self.projectors = nn.ModuleDict({_slot(k): m for k, m in (projectors or {}).items()})
        self._features: dict[str, Tensor] = {}
        Capture(model, sorted(set(self.signals.values()))).remove()  # unknown paths fail here, listed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with Capture(self.model, sorted(set(self.signals.values()))) as cap:
            out = self.model(*args, **kwargs)
        feats = {}
        for name, path in self.signals.items():
            value = _tensor_of(cap.outputs[path], path)
            slot = _slot(name)
            feats[name] = self.projectors[slot](value) if slot in self.projectors else value
        self._features = feats
        return out

    def take_features(self) -> dict[str, Tensor]:
        """The signals of the last forward pass (and forget them: they may hold the autograd graph)."""
        feats, self._features = self._features, {}
        return feats

    def projector_parameters(self) -> int:
        return sum(p.numel() for p in self.projectors.parameters())


class TapAdapter(ClassifierAdapter):
    """``base``'s batches and rows, with the signals of a :class:`FeatureTap` model as its features."""

    def __init__(self, base: ClassifierAdapter) -> None:
        self.base = base
        self.input_key = base.input_key
        self.target_key = base.target_key

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.base.batch_keys

    def rows(self, batch):
        return self.base.rows(batch)

    def batch_size(self, batch) -> int:
        return self.base.batch_size(batch)

    def forward(self, model: nn.Module, batch) -> ModelOutput:
        out = self.base.forward(model, batch)
        tap = unwrap_model(model)
        if isinstance(tap, FeatureTap):
            out.features.update(tap.take_features())
        return out


def signal_shapes(model: nn.Module, paths: Sequence[str], example: Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of each module path's output on ``example`` (``[B, ...]``), read without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Capture(model, sorted(set(paths)), detach=True) as cap:
            model(example)
        return {p: tuple(_tensor_of(cap.outputs[p], p).shape) for p in paths}
    finally:
        model.train(was_training)


def build_projector(
    kind: str, student: tuple[int, ...], teacher: tuple[int, ...], what: str
) -> nn.Module | None:
    """The projector of ``kind`` from a student signal of shape ``student`` to one of shape ``teacher``
    (both ``[B, ...]``); None when none is needed (``auto`` or ``none`` with equal shapes).

    Raises:
        ConfigError: ``none`` with shapes that differ, or a kind that cannot map these shapes (both
            shapes are named).
    """
    s, t = tuple(student[1:]), tuple(teacher[1:])
    if kind in ("auto", "none") and s == t:
        return None
    if kind == "none":
        raise ConfigError(
            f"{what}: the student signal has shape {list(student)} and the teacher's {list(teacher)}; they need "
            "a projector: set projector: auto (or linear / conv1x1 / mlp), or choose layers of the same shape"
        )
    if kind == "auto":
        kind = "conv1x1" if len(s) == 3 and len(t) == 3 and s[1:] == t[1:] else "linear"
    # (for [B, L, H] token states of the same length, linear and mlp map the width token by token)
    if kind == "conv1x1":
        if not (len(s) == 3 and len(t) == 3 and s[1:] == t[1:]):
            raise ConfigError(
                f"{what}: projector conv1x1 maps [B, C, H, W] maps of the same H x W, but the student signal has "
                f"shape {list(student)} and the teacher's {list(teacher)}; use linear, or layers of the same size"
            )
        return nn.Conv2d(s[0], t[0], kernel_size=1, bias=False)
    if len(s) == 2 and len(t) == 2 and s[0] == t[0] and kind in ("linear", "mlp"):
        # token states [B, L, H_s] -> [B, L, H_t]: one map of the width, shared by the positions (TinyBERT's W_h)
        return token_projector(kind, tuple(student), tuple(teacher), what)
    f_s, f_t = math.prod(s), math.prod(t)
    if kind == "linear":
        layers: list[nn.Module] = [nn.Linear(f_s, f_t)]
    elif kind == "mlp":
        width = max(f_s, f_t)
        layers = [nn.Linear(f_s, width), nn.ReLU(), nn.Linear(width, f_t)]
    else:
        raise ConfigError(f"{what}: unknown projector {kind!r}; use auto, none, linear, conv1x1 or mlp")
    if len(s) != 1:
        layers.insert(0, nn.Flatten(1))
    if len(t) != 1:
        layers.append(nn.Unflatten(1, t))
    return nn.Sequential(*layers)


def describe_projector(module: nn.Module) -> str:
    """``linear 64 -> 128 (8,320 parameters)``, for the run log."""
    params = sum(p.numel() for p in module.parameters())
    if isinstance(module, nn.Conv2d):
        return f"conv1x1 {module.in_channels} -> {module.out_channels} ({params:,} parameters)"
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    kind = "linear" if len(linears) == 1 else "mlp"
    return f"{kind} {linears[0].in_features} -> {linears[-1].out_features} ({params:,} parameters)"


class EncoderTap(nn.Module):
    """A Hugging Face encoder plus its named signals (:class:`distillery.models.encoder.EncoderSignals`:
    ``hidden:k``, ``attention:k``, ``q:k``, ``pooled``, ...) read on every forward pass, projected where
    asked, and the ``[B, L]`` mask of real tokens as the feature ``token_mask``.

    Args:
        model: the encoder (``AutoModel``; BERT family).
        signals: feature name -> signal name.
        projectors: feature name -> module applied to that signal (student side).
        pooling, normalize: how ``pooled`` is formed.
        detach: record the signals without their graph (teachers).
    """

    def __init__(
        self,
        model: nn.Module,
        signals: Mapping[str, str],
        projectors: Mapping[str, nn.Module] | None = None,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        detach: bool = False,
    ) -> None:
        from distillery.models.encoder import EncoderSignals

        super().__init__()
        self.model = model
        self.signals = dict(signals)
        self.projectors = nn.ModuleDict({_slot(k): m for k, m in (projectors or {}).items()})
        self.pooling, self.normalize, self.detach = pooling, normalize, detach
        self._features: dict[str, Tensor] = {}
        EncoderSignals(
            model, sorted(set(self.signals.values())), pooling=pooling
        ).remove()  # checks the names

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        from distillery.models.encoder import EncoderSignals

        names = sorted(set(self.signals.values()))
        with EncoderSignals(
            self.model, names, detach=self.detach, pooling=self.pooling, normalize=self.normalize
        ) as sig:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            read = sig.read()
            tokens = sig.attention_mask
        feats = {}
        for name, signal in self.signals.items():
            slot = _slot(name)
            feats[name] = self.projectors[slot](read[signal]) if slot in self.projectors else read[signal]
        feats[TOKEN_MASK] = tokens
        self._features = feats
        return out.last_hidden_state

    def take_features(self) -> dict[str, Tensor]:
        feats, self._features = self._features, {}
        return feats


class EncoderAdapter:
    """Batches ``{"input_ids", "attention_mask", "index"}`` of unlabelled sentences: one row per sentence
    (no target: -100), the signals of an :class:`EncoderTap` as features, no logits."""

    input_key = "input_ids"
    target_key = None

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def rows(self, batch) -> tuple[Tensor, Tensor]:
        n = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        return torch.full((n,), -100, dtype=torch.long, device=device), torch.ones(
            n, dtype=torch.bool, device=device
        )

    def batch_size(self, batch) -> int:
        return int(batch["input_ids"].shape[0])

    def forward(self, model: nn.Module, batch) -> ModelOutput:
        model(batch["input_ids"], batch.get("attention_mask"))
        tap = unwrap_model(model)
        feats = tap.take_features() if isinstance(tap, EncoderTap) else {}
        return ModelOutput(logits=None, features=feats)


def token_projector(
    kind: str, student: tuple[int, ...], teacher: tuple[int, ...], what: str
) -> nn.Module | None:
    """A projector of the last (width) dim, for encoder signals ``[B, H]`` or ``[B, L, H]`` whose other
    dims already agree; None when the shapes match (``auto``/``none``)."""
    if student == teacher and kind in ("auto", "none"):
        return None
    if student[:-1] != teacher[:-1] or kind == "none" or kind == "conv1x1":
        raise ConfigError(
            f"{what}: the student signal has shape {list(student)} and the teacher's {list(teacher)}; "
            + (
                "a projector maps the width (last dim) only: choose signals of the same kind"
                if student[:-1] != teacher[:-1]
                else "set projector: auto (or linear / mlp)"
            )
        )
    s, t = student[-1], teacher[-1]
    if kind == "mlp":
        return nn.Sequential(nn.Linear(s, max(s, t)), nn.ReLU(), nn.Linear(max(s, t), t))
    return nn.Linear(s, t)


__all__ = [
    "TOKEN_MASK",
    "EncoderAdapter",
    "EncoderTap",
    "FeatureTap",
    "TapAdapter",
    "build_projector",
    "describe_projector",
    "signal_shapes",
    "token_projector",
]
