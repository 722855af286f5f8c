"""Causal LMs for distillation runs: small Llama models built from a config, or pretrained ones."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.hub import from_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMConfig(StrictModel):
    """A causal LM: a small Llama built from a config, or a pretrained model (hub id or directory)."""

    name: Literal["causal_lm"] = "causal_lm"
    pretrained: str | None = Field(
        None,
        description="AutoModelForCausalLM.from_pretrained source; the size fields below are then ignored",
    )
    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int | None = Field(None, ge=1, description="MLP width (null: 3 x hidden_size)")
    max_positions: int = Field(512, ge=8)
    vocab_size: int | None = Field(
        None,
        ge=1,
        description="embedding rows (null: the tokenizer's size; larger: a padded vocabulary; never smaller)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the weights' dtype (bfloat16 / float16 halve their memory; the losses are computed in "
        "float32 whatever it is). On a CPU, bfloat16 matmuls are far slower than float32",
    )
    device_map: str | None = Field(
        None,
        description="pretrained models: transformers' device_map (e.g. auto: spread over the GPUs, then the "
        "CPU), for a model that does not fit on one device; the model is then left where it was placed",
    )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @model_validator(mode="after")
    def _heads_divide(self) -> CausalLMConfig:
        if self.device_map is not None and self.pretrained is None:
            raise ValueError(
                "device_map is for a pretrained model (it places the weights as they are loaded); set pretrained, "
                "or drop device_map"
            )
        if self.pretrained is None and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of heads={self.heads}")
        if self.pretrained is None and (self.hidden_size // self.heads) % 2:
            raise ValueError(
                f"hidden_size / heads = {self.hidden_size // self.heads} must be even (rotary position embeddings "
                f"rotate pairs of dimensions); change hidden_size={self.hidden_size} or heads={self.heads}"
            )
        return self


def build_causal_lm(
    cfg: CausalLMConfig, vocab_size: int, tokenizer: Any | None = None, field: str = "model"
) -> nn.Module:
    """An ``AutoModelForCausalLM``: ``from_pretrained(cfg.pretrained)``, or a Llama of the given size,
    in ``cfg.dtype`` (a pretrained model with ``cfg.device_map`` placed by transformers as it loads).

    Args:
        cfg: the model section of a run config.
        vocab_size: the tokenizer's size; ``cfg.vocab_size`` may pad it (more embedding rows).
        tokenizer: sets the pad/bos/eos ids of the model's generation config.
        field: the config section of ``cfg`` (``student``, ``teacher.model``), for messages.

    Raises:
        ConfigError: the pretrained directory or hub id does not load (see :mod:`distillery.models.hub`),
            or the model has fewer vocabulary rows than the tokenizer has ids.
    """
    import transformers

    if cfg.pretrained is not None:
        placement = {} if cfg.device_map is None else {"device_map": cfg.device_map}
        model = from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained,
            cfg.pretrained,
            f"{field}.pretrained",
            dtype=cfg.torch_dtype,
            **placement,
        )
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise ConfigError(
                f"{field}.pretrained: the model {cfg.pretrained!r} has {rows} output rows, fewer than the tokenizer's "
                f"{vocab_size} ids: it was trained with another tokenizer; set data.tokenizer={{kind: pretrained, "
                f"pretrained: {cfg.pretrained}}}"
            )
    else:
        rows = cfg.vocab_size or vocab_size
        if rows < vocab_size:
            raise ConfigError(
                f"{field}.vocab_size={rows} is smaller than the tokenizer's {vocab_size} ids; use null (the "
                "tokenizer's size) or a larger (padded) size"
            )
        config = transformers.LlamaConfig(
            vocab_size=rows,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size or 3 * cfg.hidden_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM(config).to(cfg.torch_dtype)
    if tokenizer is not None:
        for name in ("pad", "bos", "eos"):
            value = getattr(tokenizer, f"{name}_token_id", None)
            setattr(model.config, f"{name}_token_id", value)
            setattr(model.generation_config, f"{name}_token_id", value)
    return model
