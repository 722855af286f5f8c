"""Auxiliary classifier exits on intermediate layers of any classifier (multi-exit networks).

Deep-to-shallow self-distillation trains small classifier heads on intermediate layers to match
the network's own deepest prediction, so that a prediction can be taken early at a fraction of the
cost ("One Model to Train them All: Hierarchical Self-Distillation for Enhanced Early Layer
Embeddings", "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer"). :class:`MultiExit`
adds those heads to an unchanged model: features are read with forward hooks
(:mod:`distillery.capture`), so the wrapped model is never rewritten and :meth:`MultiExit.export`
hands back exactly the model that was passed in.

Design notes:

- Heads are built eagerly from a dry forward pass on an ``example_input`` (in eval mode, without
  gradients, so BatchNorm statistics are untouched): their parameters exist before the optimizer is
  created, and a state dict saved from one ``MultiExit`` loads into another built the same way.
- Hooks live only for the duration of a call. Between calls the wrapped model carries no hooks, so
  it can be deep-copied (EMA teachers), pickled, compiled or exported without stale closures.
- Exits are ordered shallow to deep by the order in which their modules finish in the dry forward
  pass (whatever order they were listed in); :attr:`MultiExit.exit_names` gives that order.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from distillery.capture import Capture, resolve_module, unwrap_model
from distillery.configbase import StrictModel
from distillery.models.adapters import HINT_FEATURE, ModelOutput, StackedClassifierAdapter

FINAL = "final"  # name of the wrapped model's own output in MultiExit.exit_names


class ExitConfig(StrictModel):
    """Where to attach auxiliary exits and what each exit head looks like.

    A head is ``pool -> [dropout] -> [Linear(F, hidden) -> ReLU] -> Linear(., C)``. Feature maps of
    three or more dims are read as ``[B, C, *spatial]``.
    """

    at: list[str] = Field(
        min_length=1, description="dotted module paths whose outputs feed an exit, e.g. ['body.2', 'layer3']"
    )
    pool: Literal["avg", "max", "flatten"] = Field(
        "avg",
        description="avg / max: pool [B, C, *spatial] over the spatial dims to [B, C]; flatten: "
        "[B, C * prod(spatial)]. Two-dimensional features [B, F] are used as they are.",
    )
    hidden: int | None = Field(None, ge=1, description="width of an optional hidden layer in each head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the pooled features of each head")
    detach: bool = Field(
        False,
        description="stop the gradient of exit losses at the backbone: heads train as probes and the "
        "backbone learns only from the final output",
    )
    hint_at: str | None = Field(
        None,
        description="feature hints (BYOT): dotted path of the deep module whose pooled output every exit "
        "learns to reproduce through its own linear projection, e.g. the input of the final classifier; "
        "train them with the `hint` loss term",
    )

    @field_validator("at")
    @classmethod
    def _distinct_module_paths(cls, at: list[str]) -> list[str]:
        if any(not path for path in at):
            raise ValueError(
                "an exit path must name a submodule; '' is the whole model (its output is 'final')"
            )
        repeated = sorted({path for path in at if at.count(path) > 1})
        if repeated:
            raise ValueError(f"exit paths must be distinct; repeated: {repeated}")
        return at


class _Pool(nn.Module):
    """``[B, C, *spatial] -> [B, C]`` (avg, max) or ``[B, C * prod(spatial)]`` (flatten); 2-D passes."""

    def __init__(self, mode: Literal["avg", "max", "flatten"]) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= 2:
            return x  # (B, F)
        if self.mode == "flatten":
            return x.flatten(1)  # (B, C * prod(spatial))
        x = x.flatten(2)  # (B, C, prod(spatial))
        return x.mean(-1) if self.mode == "avg" else x.amax(-1)  # (B, C)

    def extra_repr(self) -> str:
        return self.mode


class _StopForward(Exception):
    """Raised by an early-exit hook to abandon the rest of the backbone; carries the exit's logits."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (frozen parts stay frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _feature(output: Any, path: str) -> Tensor:
    """The tensor a head reads from a module's output: the output itself or its first element."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]  # e.g. Hugging Face layers return (hidden_states, ...)
    if not isinstance(output, Tensor) or output.dim() < 2:
        raise TypeError(
            f"module {path!r} must output a tensor [B, ...] (or a tuple starting with one) to feed an exit; "
            f"got {type(output).__name__}"
            + (f" of shape {list(output.shape)}" if isinstance(output, Tensor) else "")
        )
    return output


def _final_logits(output: Any) -> Tensor:
    """The wrapped model's logits: its output, or the ``logits`` attribute of an output object."""
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = f" of shape {list(logits.shape)}" if isinstance(logits, Tensor) else ""
        raise TypeError(
            f"MultiExit wraps classifiers returning logits [B, C]; the model returned "
            f"{type(output).__name__}{shape}"
        )
    return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MultiExit(nn.Module):
    """A classifier with auxiliary exit heads on intermediate modules; returns every exit's logits.

    ``forward(x)`` runs the wrapped model once and returns logits ``[E, B, C]`` for
    ``E = len(exit_names)`` exits ordered shallow to deep; ``[-1]`` is the wrapped model's own
    output, bit for bit. The heads are submodules (``heads.0``, ``heads.1``, ...), so ``parameters()``
    and ``state_dict()`` include them, and the state dict holds plain tensors only (safetensors and
    ``torch.load(weights_only=True)`` both work).

    Feature hints (``hint_at``, "Be Your Own Teacher", Zhang et al., ICCV 2019): each exit also gets a
    linear projection (``hint_heads``) from its pooled feature to the pooled width of a deep module's
    output; ``forward(x, hints=True)`` returns those projections next to the logits, and the ``hint``
    loss pulls them towards the (detached) deep feature. The projections are used only in training:
    predictions, :meth:`parameter_counts`, :meth:`latency` and :meth:`export` ignore them.

    Args:
        model: a classifier mapping inputs ``[B, ...]`` to logits ``[B, C]`` (a tensor, or an object
            with a ``logits`` attribute), possibly wrapped in DDP.
        exits: an :class:`ExitConfig`, or just the list of module paths (default heads).
        example_input: a batch ``[B, ...]`` (B >= 1) on the model's device, used once, in eval mode and
            without gradients, to find each exit's feature shape and the number of classes.

    Raises:
        ValueError: a path names no module (the message lists valid ones), a module does not run in
            the forward pass, or runs more than once (a shared block has no single depth).
        TypeError: the model does not return ``[B, C]`` logits, or an exit module's output is no
            ``[B, ...]`` tensor.

    Example:
        >>> import torch
        >>> from distillery.models.mlp import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MLP(16, 3, hidden=[8, 8])  # body: Flatten, Linear, ReLU, Linear, ReLU
        >>> multi = MultiExit(model, ExitConfig(at=["body.4", "body.2"]), example_input=torch.zeros(2, 16))
        >>> multi.exit_names
        ['body.2', 'body.4', 'final']
        >>> x = torch.randn(5, 16)
        >>> logits = multi(x)
        >>> logits.shape
        torch.Size([3, 5, 3])
        >>> torch.equal(logits[-1], model(x)), torch.equal(multi.predict_exit(x, 0), logits[0])
        (True, True)
        >>> multi.parameter_counts()  # body.1 (16*8 + 8) + head 0 (8*3 + 3), ...
        {'body.2': 163, 'body.4': 235, 'final': 235}
        >>> multi.export() is model
        True
    """

    def __init__(
        self,
        model: nn.Module,
        exits: ExitConfig | Sequence[str],
        example_input: Tensor,
    ) -> None:
        super().__init__()
        config = exits if isinstance(exits, ExitConfig) else ExitConfig(at=list(exits))
        self.config = config
        self.model = model

        # ---- dry forward: feature shapes, classes, execution order --------------------------------
        root = unwrap_model(model)
        name_of = {id(m): name for name, m in root.named_modules()}
        paths = [name_of[id(resolve_module(model, p))] for p in config.at]  # canonical, unwrapped names
        hint_path = None if config.hint_at is None else name_of[id(resolve_module(model, config.hint_at))]
        watched = list(dict.fromkeys([*paths, *([hint_path] if hint_path else [])]))
        finished: list[str] = []  # module names in the order their forward returned
        handles = [
            m.register_forward_hook(lambda _m, _a, _o, name=name: finished.append(name))
            for name, m in root.named_modules()
        ]
        try:
            with torch.no_grad(), _eval_mode(model), Capture(model, watched) as cap:
                final = _final_logits(model(example_input))
        finally:
            for handle in handles:
                handle.remove()
        for path in paths:
            runs = finished.count(path)
            if runs != 1:
                why = "does not run" if runs == 0 else f"runs {runs} times"
                raise ValueError(
                    f"exit module {path!r} {why} in the forward pass; an exit needs a module that runs "
                    f"exactly once. Modules in execution order: {', '.join(dict.fromkeys(finished))}"
                )
        paths.sort(key=finished.index)  # shallow -> deep
        self.paths: tuple[str, ...] = tuple(paths)
        self.hint_path: str | None = hint_path
        if hint_path is not None:
            runs = finished.count(self.hint_path)
            if runs != 1:
                why = "does not run" if runs == 0 else f"runs {runs} times"
                raise ValueError(
                    f"hint module {self.hint_path!r} {why} in the forward pass; hints need a module that "
                    f"runs exactly once. Modules in execution order: {', '.join(dict.fromkeys(finished))}"
                )

        # ---- heads ---------------------------------------------------------------------------
        num_classes = final.shape[-1]
        heads = []
        for path in self.paths:
            feature = _feature(cap.outputs[path], path)
            pool = _Pool(config.pool)
            width = pool(feature).shape[1]
            layers: list[nn.Module] = [pool]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            if config.hidden is not None:
                layers += [nn.Linear(width, config.hidden), nn.ReLU()]
                width = config.hidden
            layers.append(nn.Linear(width, num_classes))
            dtype = feature.dtype if feature.is_floating_point() else None
            heads.append(nn.Sequential(*layers).to(device=feature.device, dtype=dtype))
        self.heads = nn.ModuleList(heads)

        # Hint projections (training only): pooled exit feature -> pooled width of the hint module.
        self.hint_heads: nn.ModuleList | None = None
        if self.hint_path is not None:
            target = _Pool(config.pool)(_feature(cap.outputs[self.hint_path], self.hint_path))
            projections = []
            for path in self.paths:
                feature = _feature(cap.outputs[path], path)
                width = _Pool(config.pool)(feature).shape[1]
                dtype = feature.dtype if feature.is_floating_point() else None
                projections.append(nn.Linear(width, target.shape[1]).to(device=feature.device, dtype=dtype))
            self.hint_heads = nn.ModuleList(projections)

        # Modules a prediction at each exit needs (see parameter_counts): those that finished no later
        # than the exit module, plus its ancestors (their own parameters, e.g. a position embedding).
        self._backbone: list[tuple[str, ...]] = []
        for path in self.paths:
            done = finished[: finished.index(path) + 1]
            parts = path.split(".")
            ancestors = [".".join(parts[:k]) for k in range(len(parts))]
            self._backbone.append(tuple(dict.fromkeys([*ancestors, *done])))

    # ---- properties ----------------------------------------------------------------------------

    @property
    def exit_names(self) -> list[str]:
        """Module path of each exit, shallow to deep, then ``"final"`` (the wrapped model's output)."""
        return [*self.paths, FINAL]

    @property
    def num_exits(self) -> int:
        """``E``: auxiliary exits plus the final output."""
        return len(self.paths) + 1

    # ---- forward ------------------------------------------------------------------------------

    def _head_logits(self, index: int, output: Any) -> Tensor:
        feature = _feature(output, self.paths[index])
        if self.config.detach:
            feature = feature.detach()
        return self.heads[index](feature)  # (B, C)

    def forward(self, x: Tensor, hints: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of every exit, ``[E, B, C]``, shallow to deep; ``[-1]`` is ``model(x)``.

        Args:
            x: the wrapped model's input ``[B, ...]``.
            hints: also return the hint features ``[E, B, F]`` (needs ``hint_at``): row ``e < E - 1`` is
                exit e's projected pooled feature, row ``E - 1`` the pooled output of the hint module
                itself (the target, which the teacher detaches).
        """
        if hints and self.hint_heads is None:
            raise ValueError("hint features need exits configured with hint_at (the module to learn from)")
        watched = list(dict.fromkeys([*self.paths, *([self.hint_path] if hints else [])]))
        with Capture(self.model, watched) as cap:
            final = _final_logits(self.model(x))  # (B, C)
        missing = [p for p in watched if p not in cap.outputs]
        if missing:
            raise RuntimeError(f"exit modules {missing} did not run in this forward pass")
        exits = [self._head_logits(i, cap.outputs[p]) for i, p in enumerate(self.paths)]
        logits = torch.stack([*exits, final])  # (E, B, C)
        if not hints:
            return logits
        pool = _Pool(self.config.pool)
        projected = []
        for i, path in enumerate(self.paths):
            feature = _feature(cap.outputs[path], path)
            if self.config.detach:
                feature = feature.detach()
            projected.append(self.hint_heads[i](pool(feature)))  # (B, F)
        target = pool(_feature(cap.outputs[self.hint_path], self.hint_path))  # (B, F)
        return logits, torch.stack([*projected, target])  # (E, B, F)

    def _exit_index(self, at: int | str) -> int:
        names = self.exit_names
        if isinstance(at, str):
            if at not in names:
                raise ValueError(f"unknown exit {at!r}; exits are {names}")
            return names.index(at)
        if not -len(names) <= at < len(names):
            raise IndexError(f"exit index {at} out of range for {len(names)} exits {names}")
        return at % len(names)

    def predict_exit(self, x: Tensor, at: int | str) -> Tensor:
        """Early exit: logits ``[B, C]`` of one exit, running the backbone only up to its module.

        A hook on the exit module computes the head's logits and raises a private exception that
        abandons the rest of the forward pass, so the cost is that of a truncated network. The result
        equals ``self(x)[at]`` (in eval mode, or with the same random state for dropout).

        Args:
            x: input ``[B, ...]``.
            at: exit index into :attr:`exit_names` (negative counts from the end) or exit name.
        """
        index = self._exit_index(at)
        if index == len(self.paths):
            return _final_logits(self.model(x))  # (B, C)

        def stop(_module: nn.Module, _args: Any, output: Any) -> None:
            raise _StopForward(self._head_logits(index, output))

        handle = resolve_module(self.model, self.paths[index]).register_forward_hook(stop)
        try:
            self.model(x)
        except _StopForward as early:
            return early.logits  # (B, C)
        finally:
            handle.remove()
        raise RuntimeError(f"exit module {self.paths[index]!r} did not run in this forward pass")

    # ---- cost of each exit ------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Parameters a prediction at each exit needs: its share of the backbone plus its head.

        The backbone share of an exit is an approximation recorded during the dry forward pass: the
        parameters held directly by every module whose forward finished no later than the exit
        module (including the exit module's own children), plus those held directly by its ancestors
        (e.g. a ViT position embedding on the root). Ancestor parameters used only after the exit
        are over-counted. Tied parameters count once. ``"final"`` is the whole wrapped model.
        """
        modules = dict(unwrap_model(self.model).named_modules())
        counts: dict[str, int] = {}
        for index, path in enumerate(self.paths):
            sizes = {
                id(p): p.numel()
                for name in self._backbone[index]
                for p in modules[name].parameters(recurse=False)
            }
            counts[path] = sum(sizes.values()) + sum(p.numel() for p in self.heads[index].parameters())
        counts[FINAL] = sum(p.numel() for p in self.model.parameters())
        return counts

    @torch.no_grad()
    def latency(self, x: Tensor, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
        """Median wall time in seconds of :meth:`predict_exit` on ``x``, per exit name.

        Runs in eval mode without gradients (each module's own mode is restored afterwards) and
        synchronises CUDA around each call. Numbers are for reports and benchmarks, not for tests.

        Args:
            x: input batch ``[B, ...]`` on the model's device.
            repeats: timed calls per exit (the median is reported).
            warmup: untimed calls per exit before timing.
        """
        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
        result: dict[str, float] = {}
        with _eval_mode(self):
            for index, name in enumerate(self.exit_names):
                for _ in range(warmup):
                    self.predict_exit(x, index)
                times = []
                for _ in range(repeats):
                    _sync(x.device)
                    start = time.perf_counter()
                    self.predict_exit(x, index)
                    _sync(x.device)
                    times.append(time.perf_counter() - start)
                result[name] = statistics.median(times)
        return result

    # ---- export ---------------------------------------------------------------------------------

    def export(self) -> nn.Module:
        """The wrapped model, without exits: the student to deploy.

        ``MultiExit`` registers hooks only while one of its calls runs, so the returned module (the
        very object passed in, sharing its parameters) carries no hooks of ours, and
        ``export()(x)`` equals ``self(x)[-1]``. Its ``state_dict`` is the ``model.`` part of this one,
        without the prefix.
        """
        return self.model

    def extra_repr(self) -> str:
        hints = "" if self.hint_path is None else f", hint_at={self.hint_path!r}"
        return f"exits={list(self.paths)}, pool={self.config.pool!r}{hints}"


class MultiExitAdapter(StackedClassifierAdapter):
    """Calls a :class:`MultiExit` student; with hints, its output carries ``features["hint"]`` ``[E, B, F]``.

    Evaluation uses the plain stacked logits; only training asks for the hint features, which the
    deepest-exit teacher turns into targets.
    """

    def __init__(self, members: int, hints: bool = False) -> None:
        super().__init__(members)
        self.hints = hints

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        if not self.hints:
            return super().forward(model, batch)
        logits, hints = model(batch[self.input_key], hints=True)  # (E, B, C), (E, B, F)
        return ModelOutput(logits=logits, features={HINT_FEATURE: hints})
