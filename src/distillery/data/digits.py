"""scikit-learn's handwritten digits (1,797 8x8 images, bundled with scikit-learn: always offline)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits_arrays() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``x [N, 1, 8, 8]`` in [0, 1] and ``y [N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y
