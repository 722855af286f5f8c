"""Compressed students: int8 quantization-aware training and gradual magnitude pruning.

A classification run with a ``compress:`` section trains every student arm (the cross-entropy control
and the distilled one) in the compressed form, so the paired difference is what the teacher adds to a
compressed student:

* ``compress: {method: qat, backend, per_channel}`` -- fake quantization of weights (per output channel
  by default) and activations while training, through PyTorch's FX graph mode QAT
  (``torch.ao.quantization.quantize_fx.prepare_qat_fx``; convolutions and their ReLUs fused); after
  training the student is converted to a real int8 model (``convert_fx``), which is what the test split
  is evaluated on and what ``student-int8.pt`` holds. "Model compression via distillation and
  quantization" (Polino, Pascanu & Alistarh, 2018) trains such students with a full-precision teacher.
* ``compress: {method: prune, sparsity, start, end, every}`` -- unstructured magnitude pruning of every
  convolution and linear weight (``torch.nn.utils.prune``: a mask buffer and the weight's original
  values) at the sparsity of :func:`distillery.functional.sparsity_at` (Zhu & Gupta's cubic schedule),
  masks recomputed before every ``every``-th step; the export is the plain architecture with the
  pruned weights zero.

Masks, observers and fake-quantization scales are buffers of the trained module: checkpoints hold them
and resume restores them (the schedule is a function of the step).

``torch.ao.quantization`` warns that it is deprecated in favour of ``torchao``; it still ships with
PyTorch and is what runs here without another dependency. Its warnings are silenced inside these
functions only.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.functional.compression import magnitude_mask, sparsity_at


class QATConfig(StrictModel):
    """Quantization-aware training to int8 (weights and activations)."""

    method: Literal["qat"] = "qat"
    backend: str = Field(
        "x86",
        description="the quantized engine the int8 model runs on (torch.backends.quantized.supported_engines)",
    )
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)")

    @model_validator(mode="after")
    def _backend(self) -> QATConfig:
        engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
        if self.backend not in engines:
            raise ValueError(
                f"compress.backend={self.backend!r} is not a quantized engine this CPU's PyTorch supports; "
                f"supported: {', '.join(engines)} (x86 on Intel/AMD, qnnpack on ARM)"
            )
        return self


class PruneConfig(StrictModel):
    """Gradual magnitude pruning to a final sparsity."""

    method: Literal["prune"] = "prune"
    sparsity: float = Field(..., ge=0.0, lt=1.0, description="final fraction of each weight set to zero")
    start: float = Field(0.1, ge=0.0, lt=1.0, description="pruning starts at this fraction of training")
    end: float = Field(0.7, gt=0.0, le=1.0, description="the final sparsity is reached at this fraction")
    every: int = Field(10, ge=1, description="steps between mask updates")

    @model_validator(mode="after")
    def _window(self) -> PruneConfig:
        if self.start >= self.end:
            raise ValueError(f"compress.start={self.start} must be below compress.end={self.end}")
        return self


CompressConfig = Annotated[QATConfig | PruneConfig, Field(discriminator="method")]


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        yield


# ---- quantization-aware training --------------------------------------------------------------------


def _qconfig_mapping(cfg: QATConfig):
    from torch.ao.quantization import (
        QConfig,
        default_fake_quant,
        default_weight_fake_quant,
        get_default_qat_qconfig_mapping,
    )

    mapping = get_default_qat_qconfig_mapping(cfg.backend)
    if not cfg.per_channel:
        mapping = mapping.set_global(QConfig(activation=default_fake_quant, weight=default_weight_fake_quant))
    return mapping


def prepare_qat(model: nn.Module, cfg: QATConfig, example: Tensor) -> nn.Module:
    """``model`` with fake quantization inserted (a ``torch.fx.GraphModule``; ``model`` is not changed).
    Parameter names stay those of ``model`` (a fused conv + ReLU keeps the convolution's name).

    Raises:
        ConfigError: the model cannot be traced by ``torch.fx`` (control flow on values).
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.backends.quantized.engine = cfg.backend
    with _quiet():
        try:
            return prepare_qat_fx(copy.deepcopy(model).train(), _qconfig_mapping(cfg), (example,))
        except Exception as exc:  # torch.fx raises several kinds on untraceable code
            raise ConfigError(
                f"compress.method=qat: {type(model).__name__} cannot be prepared for quantization-aware training "
                f"by torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0]}); use a cnn or mlp student"
            ) from None


@contextmanager
def observers_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the fake-quantization observers of ``model`` do not update (an evaluation must not
    change the quantization ranges); their flags are restored after."""
    flags = [(m, m.observer_enabled.clone()) for m in model.modules() if hasattr(m, "observer_enabled")]
    for m, _ in flags:
        m.observer_enabled.fill_(0)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.observer_enabled.copy_(flag)


def convert_int8(qat_model: nn.Module, backend: str) -> nn.Module:
    """The real int8 model of a QAT-trained one (a copy; on CPU, in eval mode)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.backends.quantized.engine = backend
    with _quiet():
        return convert_fx(copy.deepcopy(qat_model).cpu().eval())


def float_weights(trained: nn.Module, plain: nn.Module) -> nn.Module:
    """Load the float parameters and buffers of a QAT- or prune-trained module into ``plain`` (the
    architecture) and return it: a pruned weight as ``weight_orig * weight_mask``, observers dropped."""
    state = trained.state_dict()
    values = {}
    for key in plain.state_dict():
        if key in state:
            values[key] = state[key]
        elif key.endswith("weight") and f"{key}_orig" in state:  # pruned: the masked values
            values[key] = state[f"{key}_orig"] * state[f"{key}_mask"]
        else:
            raise KeyError(f"the trained student has no value for {key}")
    plain.load_state_dict(values)
    return plain


# ---- pruning ----------------------------------------------------------------------------------------


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolution and linear layers whose weights are pruned."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def prepare_pruning(model: nn.Module) -> nn.Module:
    """Give every prunable weight a mask (all ones): ``weight_orig`` becomes the parameter and
    ``weight_mask`` a buffer, so checkpoints carry the masks."""
    from torch.nn.utils import prune

    layers = prunable(model)
    if not layers:
        raise ConfigError(
            f"compress.method=prune: {type(model).__name__} has no convolution or linear layer to prune"
        )
    for _, module in layers:
        prune.identity(module, "weight")
    return model


class PruningSchedule:
    """Called before every step (``fit(before_step=...)``): on every ``cfg.every``-th step inside the
    schedule, each layer's mask is recomputed from its current masked weights at the target sparsity.
    A function of the weights and the step only, so a resumed run recomputes exactly the same masks."""

    def __init__(self, cfg: PruneConfig, total_steps: int) -> None:
        self.cfg, self.total_steps = cfg, total_steps

    def target(self, step: int) -> float:
        c = self.cfg
        return sparsity_at(step, self.total_steps, c.sparsity, c.start, c.end)

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % self.cfg.every:
            return
        target = self.target(step)
        with torch.no_grad():
            for _, module in prunable(model):
                if not hasattr(module, "weight_mask"):
                    continue
                effective = module.weight_orig * module.weight_mask
                mask = magnitude_mask(effective, target)
                if not torch.equal(mask, module.weight_mask):
                    module.weight_mask.copy_(mask)
                    module.weight_orig.mul_(
                        mask
                    )  # pruned weights are zero, and stay so in the optimizer's view


def sparsity(model: nn.Module) -> float:
    """The fraction of zero entries over the prunable weights of ``model`` (pruned or plain)."""
    zeros = total = 0
    for _, module in prunable(model):
        w = module.weight_orig * module.weight_mask if hasattr(module, "weight_mask") else module.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


# ---- what a compressed model costs --------------------------------------------------------------------


def saved_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of ``torch.save(state)``: the model as it is stored."""
    buffer = io.BytesIO()
    with _quiet():
        torch.save(state, buffer)
    return buffer.tell()


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model with every weight matrix (a convolution's flattened to
    ``[out, in * k * k]``) in CSR form with int32 indices -- values, column indices, row offsets -- and the
    rest dense: what unstructured sparsity saves on disk."""
    state = {}
    with _quiet():
        for key, value in model.state_dict().items():
            if key.endswith("weight") and value.dim() > 1:
                csr = value.reshape(value.shape[0], -1).to_sparse_csr()
                value = torch.sparse_csr_tensor(
                    csr.crow_indices().int(),
                    csr.col_indices().int(),
                    csr.values(),
                    csr.shape,
                    check_invariants=False,
                )
            state[key] = value
    return saved_bytes(state)


def latency_ms(model: nn.Module, x: Tensor, repeats: int = 20) -> float:
    """Median milliseconds of ``model(x)`` on one CPU thread (after two warm-up calls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.eval()
        times = []
        with torch.no_grad(), _quiet():
            for i in range(repeats + 2):
                t0 = time.perf_counter()
                model(x)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        return 1000.0 * statistics.median(times)
    finally:
        torch.set_num_threads(threads)


__all__ = [
    "CompressConfig",
    "PruneConfig",
    "PruningSchedule",
    "QATConfig",
    "convert_int8",
    "float_weights",
    "latency_ms",
    "observers_frozen",
    "prepare_pruning",
    "prepare_qat",
    "prunable",
    "saved_bytes",
    "sparse_bytes",
    "sparsity",
]
