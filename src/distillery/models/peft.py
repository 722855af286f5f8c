"""LoRA students through Hugging Face ``peft``: ``student.peft: {r, alpha, target_modules, dropout}``.

The student is its base model with low-rank adapters on the named linear layers; only the adapters
train (the base weights are frozen, so the optimizer holds state for the adapters alone). A saved
student has its adapter (``save_pretrained`` of the ``PeftModel``: ``adapter_config.json`` and
``adapter_model.safetensors``) and, with ``merge: true``, the merged model: base + B A x alpha / r
folded into each adapted weight, a plain ``AutoModelForCausalLM`` directory that loads without peft.

``peft`` is an optional extra (``pip install 'distillery[peft]'``); a config that asks for it without
it installed is an error that says so.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field

from distillery.configbase import StrictModel
from distillery.errors import ConfigError


class PeftConfig(StrictModel):
    """LoRA adapters on a causal LM student (``peft.LoraConfig``)."""

    r: int = Field(8, ge=1, description="the rank of each adapter")
    alpha: float = Field(16.0, gt=0.0, description="the adapter scale is alpha / r")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="the linear layers that get adapters: names (suffixes of module paths), or all-linear",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    merge: bool = Field(
        True,
        description="also save the merged model (base + adapters) as a plain save_pretrained directory; false: "
        "the adapter only (needs a pretrained base that can be loaded again)",
    )


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "student.peft needs the peft package: pip install 'distillery[peft]' (or pip install peft)"
        ) from None
    return peft


def apply_peft(model: Any, cfg: PeftConfig, field: str = "student.peft") -> Any:
    """``model`` wrapped as a ``peft.PeftModel`` with LoRA adapters; the base weights are frozen.

    Raises:
        ConfigError: peft is missing, or ``target_modules`` names no layer of the model.
    """
    peft = _peft()
    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        target_modules=cfg.target_modules,
        lora_dropout=cfg.dropout,
        task_type="CAUSAL_LM",
    )
    try:
        with (
            warnings.catch_warnings()
        ):  # peft asks transformers 5 by a name it deprecated: not the user's to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"{field}.target_modules={cfg.target_modules!r}: {str(exc).splitlines()[0]}; the model's linear "
            f"layers are named {linear}"
        ) from None


def check_peft_targets(build: Any, cfg: PeftConfig, field: str = "student.peft") -> None:
    """Apply ``cfg`` to ``build()`` made on the ``meta`` device (no weights are allocated or loaded), so
    that adapters on layers the model lacks fail before anything trains.

    Raises:
        ConfigError: as :func:`apply_peft`.
    """
    import torch

    with torch.device("meta"):
        apply_peft(build(), cfg, field)


def _is_linear(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


def merged_copy(model: Any) -> Any:
    """The base model with every adapter folded into its weights (a copy: ``model`` is unchanged)."""
    return copy.deepcopy(model).merge_and_unload()


def save_peft_student(model: Any, directory: Path, merge: bool) -> None:
    """The adapter in ``directory/adapter``; with ``merge``, the merged model in ``directory/model``."""
    model.save_pretrained(directory / "adapter")
    if merge:
        merged_copy(model).save_pretrained(directory / "model")


def load_peft_student(base: Any, adapter_dir: Path) -> Any:
    """``base`` with the saved adapter of ``adapter_dir`` (for evaluation: not trainable)."""
    return _peft().PeftModel.from_pretrained(base, str(adapter_dir))
