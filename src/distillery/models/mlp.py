"""A multi-layer perceptron for small inputs (flattened images, tabular features)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from distillery.configbase import StrictModel


class MLPConfig(StrictModel):
    """A fully connected network: ``Linear -> ReLU -> Dropout`` per hidden layer, then a linear head."""

    name: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = Field(
        default_factory=lambda: [128],
        description="widths of the hidden layers (each >= 1; [] = a linear model)",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the inputs")


class MLP(nn.Module):
    """Flattens its input and applies a stack of ``Linear -> ReLU -> Dropout`` layers and a head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: list[int] | tuple[int, ...] = (128,),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, C)


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int, field: str = "model") -> MLP:
    in_features = int(torch.tensor(input_shape).prod())
    return MLP(in_features, num_classes, cfg.hidden, cfg.dropout, cfg.input_dropout)
