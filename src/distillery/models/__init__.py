"""Reference architectures for examples, tests and benchmarks, and adapters for calling any model.

Models are named in YAML by a short name from :data:`MODELS`, an explicit table.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from distillery.models.adapters import ClassifierAdapter, ModelOutput
from distillery.models.cnn import CNNConfig, SmallCNN, build_cnn
from distillery.models.ensemble import Ensemble
from distillery.models.mlp import MLP, MLPConfig, build_mlp
from distillery.models.pretrained import PretrainedClassifierConfig, build_pretrained_classifier

# name -> (config model, builder(config, input_shape, num_classes, field))
MODELS = {
    "mlp": (MLPConfig, build_mlp),
    "cnn": (CNNConfig, build_cnn),
    "pretrained": (PretrainedClassifierConfig, build_pretrained_classifier),
}

ModelConfig = Annotated[MLPConfig | CNNConfig | PretrainedClassifierConfig, Field(discriminator="name")]


def named_model(value):
    """``{pretrained: <dir>}`` without a ``name`` is the pretrained architecture (YAML shorthand)."""
    if isinstance(value, dict) and "name" not in value and "pretrained" in value:
        return {"name": "pretrained", **value}
    return value


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, field: str = "model"
) -> nn.Module:
    """Build the architecture described by ``cfg`` for inputs of ``input_shape`` and ``num_classes``.

    ``field`` is the config section that holds ``cfg`` (``student``, ``teacher.model``): errors about
    the model (a pretrained directory that does not load, a model that does not fit the data) name it.
    """
    _, builder = MODELS[cfg.name]
    return builder(cfg, input_shape, num_classes, field)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MLP",
    "MODELS",
    "CNNConfig",
    "ClassifierAdapter",
    "Ensemble",
    "MLPConfig",
    "ModelConfig",
    "ModelOutput",
    "PretrainedClassifierConfig",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "named_model",
]
