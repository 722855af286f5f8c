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

# name -> (config model, builder(config, input_shape, num_classes))
MODELS = {
    "mlp": (MLPConfig, build_mlp),
    "cnn": (CNNConfig, build_cnn),
}

ModelConfig = Annotated[MLPConfig | CNNConfig, Field(discriminator="name")]


def build_model(cfg: MLPConfig | CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the architecture described by ``cfg`` for inputs of ``input_shape`` and ``num_classes``."""
    _, builder = MODELS[cfg.name]
    return builder(cfg, input_shape, num_classes)


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
    "SmallCNN",
    "build_model",
    "count_parameters",
]
