"""A small convolutional network for image classification (digits, Fashion-MNIST)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError


class CNNConfig(StrictModel):
    """3x3 convolutions with ReLU (batch norm between them with ``batch_norm``), 2x2 max-pooling after
    every ``pool_every`` convolutions, global average pooling, dropout and a linear head."""

    name: Literal["cnn"] = "cnn"
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [24, 48, 48], min_length=1, description="output channels of each convolution"
    )
    pool_every: int = Field(2, ge=1, description="max-pool (2x2) after every this many convolutions")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the head")
    pool_to: int = Field(
        1,
        ge=1,
        description="average-pool the last feature map to pool_to x pool_to (1: global average pooling)",
    )
    batch_norm: bool = Field(
        False,
        description="batch norm after every convolution (its running statistics are what DeepInversion matches)",
    )


class SmallCNN(nn.Module):
    """Convolutional feature extractor + linear head. Input ``(B, C_in, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: list[int] | tuple[int, ...] = (24, 48, 48),
        pool_every: int = 2,
        dropout: float = 0.3,
        pool_to: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            norm = [nn.BatchNorm2d(c)] if batch_norm else []
            layers += [nn.Conv2d(width, c, kernel_size=3, padding=1), *norm, nn.ReLU()]
            if (i + 1) % pool_every == 0 and i + 1 < len(channels):
                layers.append(nn.MaxPool2d(2))
            width = c
        layers += [nn.AdaptiveAvgPool2d(pool_to), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width * pool_to * pool_to, num_classes)
        # channels-last convolutions are ~20% faster on CPU (oneDNN); results are the same maths.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # (B, C_in, H, W)
        return self.head(self.body(x))  # (B, C)


def build_cnn(
    cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int, field: str = "model"
) -> SmallCNN:
    if len(input_shape) != 3:
        raise ConfigError(
            f"{field}: the cnn model needs image inputs (C, H, W); this data has shape {input_shape}; use mlp"
        )
    return SmallCNN(
        input_shape[0], num_classes, cfg.channels, cfg.pool_every, cfg.dropout, cfg.pool_to, cfg.batch_norm
    )
