"""Reference architectures for examples, tests and benchmarks, and adapters for calling any model.

Models are named in YAML by a short name from :data:`MODELS`, an explicit table.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from distillery.errors import ConfigError
from distillery.models.adapters import ClassifierAdapter, ModelOutput
from distillery.models.cnn import CNNConfig, SmallCNN, build_cnn
from distillery.models.ensemble import Ensemble
from distillery.models.mlp import MLP, MLPConfig, build_mlp
from distillery.models.pretrained import PretrainedClassifierConfig, build_pretrained_classifier
from distillery.models.text import (
    BowMLP,
    BowMLPConfig,
    TextCNN,
    TextCNNConfig,
    TextTokenizerConfig,
    build_bow_mlp,
    build_text_cnn,
)
from distillery.models.vit import DeiTAdapter, ViTClassifier, ViTClassifierConfig, build_vit

# name -> (config model, builder(config, input_shape, num_classes, field[, vocab_size, pad_token_id]))
MODELS = {
    "mlp": (MLPConfig, build_mlp),
    "cnn": (CNNConfig, build_cnn),
    "vit": (ViTClassifierConfig, build_vit),
    "text_cnn": (TextCNNConfig, build_text_cnn),
    "bow_mlp": (BowMLPConfig, build_bow_mlp),
    "pretrained": (PretrainedClassifierConfig, build_pretrained_classifier),
}
# Models that take token ids (their builders take the tokenizer's size); `pretrained` takes text when it
# is a sequence classifier, images when it is an image classifier.
TEXT_MODELS = ("bow_mlp", "text_cnn")
NUMBER_MODELS = ("cnn", "mlp", "vit")
TEXT_MODELS_HELP = "bow_mlp, text_cnn, or pretrained (a Hugging Face sequence classifier)"

ModelConfig = Annotated[
    MLPConfig | CNNConfig | ViTClassifierConfig | TextCNNConfig | BowMLPConfig | PretrainedClassifierConfig,
    Field(discriminator="name"),
]


def named_model(value):
    """``{pretrained: <dir>}`` without a ``name`` is the pretrained architecture (YAML shorthand)."""
    if isinstance(value, dict) and "name" not in value and "pretrained" in value:
        return {"name": "pretrained", **value}
    return value


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    field: str = "model",
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """Build the architecture described by ``cfg`` for inputs of ``input_shape`` and ``num_classes``.

    ``field`` is the config section that holds ``cfg`` (``student``, ``teacher.model``): errors about
    the model (a pretrained directory that does not load, a model that does not fit the data) name it.
    Text data give ``vocab_size`` (the length of the model's tokenizer; ``input_shape`` is then
    ``(L,)``, token ids) and ``pad_token_id``; only text models (:data:`TEXT_MODELS`, a pretrained
    sequence classifier) take them.
    """
    _, builder = MODELS[cfg.name]
    if cfg.name in NUMBER_MODELS:
        if vocab_size is not None:
            raise ConfigError(
                f"{field}: the {cfg.name} model takes numbers, but this run's data are text (data.text_field); "
                f"models that take text: {TEXT_MODELS_HELP}"
            )
        return builder(cfg, input_shape, num_classes, field)
    return builder(cfg, input_shape, num_classes, field, vocab_size=vocab_size, pad_token_id=pad_token_id)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MLP",
    "MODELS",
    "NUMBER_MODELS",
    "TEXT_MODELS",
    "TEXT_MODELS_HELP",
    "BowMLP",
    "BowMLPConfig",
    "CNNConfig",
    "ClassifierAdapter",
    "DeiTAdapter",
    "Ensemble",
    "MLPConfig",
    "ModelConfig",
    "ModelOutput",
    "PretrainedClassifierConfig",
    "SmallCNN",
    "TextCNN",
    "TextCNNConfig",
    "TextTokenizerConfig",
    "ViTClassifier",
    "ViTClassifierConfig",
    "build_model",
    "count_parameters",
    "named_model",
]
