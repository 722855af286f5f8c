"""A small Vision Transformer classifier (``student: {name: vit}``), optionally with DeiT's
distillation token.

Built from a config with Hugging Face ``transformers``: ``ViTForImageClassification`` without a
distillation token, ``DeiTForImageClassificationWithTeacher`` with one ("Training data-efficient
image transformers & distillation through attention", Touvron et al., ICML 2021): a second learnt
token beside [CLS], with its own linear head, that the ``deit`` loss term trains on the teacher's
decisions while the [CLS] head learns the labels. ``model(x)`` returns the mean of the two heads'
logits (DeiT's test-time rule, as ``DeiTForImageClassificationWithTeacher`` returns at inference),
or the [CLS] head alone when ``mean_heads`` is off (a student whose distillation head was never
trained: the cross-entropy baseline). :class:`DeiTAdapter` gives the loss terms both heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.adapters import ClassifierAdapter, ModelOutput

DEIT_DIST = "deit.dist"  # batch feature: the distillation head's logits [B, C] (read by the deit term)


class ViTClassifierConfig(StrictModel):
    """A small ViT classifier; ``distillation_token`` makes it DeiT's student."""

    name: Literal["vit"] = "vit"
    patch_size: int = Field(4, ge=1, description="side of a square patch; must divide the image side")
    depth: int = Field(4, ge=1, description="transformer blocks")
    width: int = Field(64, ge=8, description="embedding width")
    heads: int = Field(4, ge=1, description="attention heads (must divide width)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP width as a multiple of the embedding width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the blocks")
    distillation_token: bool = Field(False, description="add DeiT's distillation token and head")


def hf_vit_kwargs(cfg, image_size: int, channels: int, dropout: float = 0.0, **extra) -> dict:
    """The Hugging Face ``ViTConfig`` / ``DeiTConfig`` fields of a small ViT config (patch size, depth,
    width, heads, MLP ratio), shared by the classifier here and the self-supervised backbone."""
    return dict(
        image_size=image_size,
        patch_size=cfg.patch_size,
        num_channels=channels,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=round(cfg.mlp_ratio * cfg.width),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **extra,
    )


class ViTClassifier(nn.Module):
    """``forward(x [B, C, H, W]) -> [B, K]`` logits; ``heads(x) -> ([CLS] logits, distillation logits)``."""

    def __init__(self, cfg: ViTClassifierConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTForImageClassification
        from transformers import ViTConfig as HFViTConfig

        kwargs = hf_vit_kwargs(cfg, input_shape[1], input_shape[0], cfg.dropout, num_labels=num_classes)
        if cfg.distillation_token:
            self.net = DeiTForImageClassificationWithTeacher(DeiTConfig(**kwargs))
        else:
            self.net = ViTForImageClassification(HFViTConfig(**kwargs))
        self.distillation_token = cfg.distillation_token
        # 1: predict with the mean of both heads (DeiT); 0: the [CLS] head only. Saved with the weights.
        self.register_buffer("mean_heads", torch.tensor(1.0 if cfg.distillation_token else 0.0))

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(pixel_values=x)
        if not self.distillation_token:
            return out.logits, None
        return out.cls_logits, out.distillation_logits

    def forward(self, x: Tensor) -> Tensor:
        cls, dist = self.heads(x)
        if dist is None or self.mean_heads.item() == 0:
            return cls
        return (cls + dist) / 2


def build_vit(
    cfg: ViTClassifierConfig, input_shape: tuple[int, ...], num_classes: int, field: str = "model"
) -> ViTClassifier:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ConfigError(
            f"{field}: the vit model needs square images (C, H, H); this data has shape {tuple(input_shape)}"
        )
    if input_shape[1] % cfg.patch_size:
        raise ConfigError(
            f"{field}.patch_size={cfg.patch_size} does not divide the image side {input_shape[1]}; choose a divisor"
        )
    if cfg.width % cfg.heads:
        raise ConfigError(f"{field}.heads={cfg.heads} does not divide {field}.width={cfg.width}")
    return ViTClassifier(cfg, input_shape, num_classes)


class DeiTAdapter(ClassifierAdapter):
    """For a :class:`ViTClassifier` with a distillation token: ``logits`` are the [CLS] head's (what
    ``ce`` and the other logit terms read) and ``features[DEIT_DIST]`` the distillation head's."""

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        cls, dist = model.heads(batch[self.input_key])
        return ModelOutput(logits=cls, features={DEIT_DIST: dist})


__all__ = ["DEIT_DIST", "DeiTAdapter", "ViTClassifier", "ViTClassifierConfig", "build_vit", "hf_vit_kwargs"]
