"""Training-time augmentations for image batches, in plain torch (no torchvision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.configbase import StrictModel


class AugmentConfig(StrictModel):
    """Random transformations applied to each training batch (images ``[B, C, H, W]``)."""

    shift: int = Field(0, ge=0, description="random translation by up to this many pixels (zero padding)")
    hflip: bool = Field(False, description="random horizontal flips")
    noise: float = Field(0.0, ge=0.0, description="std of additive Gaussian noise")

    def is_identity(self) -> bool:
        return self.shift == 0 and not self.hflip and self.noise == 0.0


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an independent offset in ``[-max_shift, max_shift]`` on both axes."""
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]  # (B, C, H, W)


def augment_batch(
    batch: dict[str, Tensor], cfg: AugmentConfig, generator: torch.Generator
) -> dict[str, Tensor]:
    """Return a copy of ``batch`` with its ``"x"`` images transformed; other keys untouched."""
    if cfg.is_identity():
        return batch
    x = batch["x"]
    if x.dim() != 4:
        raise ValueError(f"augmentation needs image batches (B, C, H, W); got shape {tuple(x.shape)}")
    if cfg.shift > 0:
        x = random_shift(x, cfg.shift, generator)
    if cfg.hflip:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.noise > 0:
        x = x + cfg.noise * torch.randn(x.shape, generator=generator)
    return {**batch, "x": x}
