"""DeepInversion: a transfer set synthesised from a trained teacher alone, for data-free distillation.

"Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (Yin et al., CVPR 2020). Each
batch starts from Gaussian noise and is optimised with Adam so that the frozen teacher (in eval mode)
classifies it as its targets (the classes in turn) while the per-channel statistics at the input of
each of its batch-norm layers match the running statistics stored there, under total-variation and l2
priors (the maths: :mod:`distillery.functional.data_free`). At each iteration the batch is shifted by a
random jitter of up to ``jitter`` pixels (``torch.roll``) and flipped left-right with probability 1/2,
as in the official code. The official code returns the last iterate (its "best" copy aliases the
optimised tensor); so does this one.

Everything is drawn from a generator seeded by ``seed``: the same teacher and seed give the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.functional.data_free import (
    batch_norm_statistics,
    bn_feature_loss,
    image_l2,
    image_total_variation,
)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class DeepInversionConfig(StrictModel):
    """``data_free:`` -- how the teacher's inputs are synthesised. Defaults follow the official CIFAR-10
    script (Adam at 0.1, 2,000 iterations, batch-norm weight 100 (``r_feature``), total variation 2.5e-5)
    with fewer iterations; l2 as the paper's ImageNet settings (1e-5 scale here)."""

    method: Literal["deepinversion"] = "deepinversion"
    images: int = Field(2048, ge=1, description="synthesised images (the transfer set of the distilled arm)")
    batch_size: int = Field(
        256, ge=2, description="images optimised together (batch statistics need several)"
    )
    steps: int = Field(1000, ge=1, description="Adam iterations per batch")
    lr: float = Field(0.1, gt=0.0)
    bn_weight: float = Field(100.0, ge=0.0, description="weight of R_feature (the batch-norm statistics)")
    first_bn_multiplier: float = Field(1.0, gt=0.0, description="extra weight of the first batch-norm layer")
    tv_weight: float = Field(2.5e-5, ge=0.0, description="weight of the total-variation prior")
    l2_weight: float = Field(1e-5, ge=0.0, description="weight of the l2 prior")
    jitter: int = Field(1, ge=0, description="random shift of up to this many pixels each iteration")
    flip: bool = Field(True, description="random left-right flips each iteration")


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS)]


class _Statistics:
    """Forward pre-hooks that keep the batch statistics of each batch-norm layer's input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args):
            self.stats[i] = batch_norm_statistics(args[0])

        return hook

    def loss(self, weights: list[float]) -> Tensor:
        means = [s[0] for s in self.stats]
        variances = [s[1] for s in self.stats]
        return bn_feature_loss(
            means,
            variances,
            [m.running_mean for m in self.layers],
            [m.running_var for m in self.layers],
            weights,
        )

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def synthesize(
    teacher: nn.Module,
    cfg: DeepInversionConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[Tensor, Tensor, list[dict[str, float]]]:
    """``cfg.images`` inputs synthesised from ``teacher`` (not changed): ``(x [N, *input_shape], targets
    [N], per-batch final losses)``; the targets cycle through the classes.

    Raises:
        ConfigError: the teacher has no batch-norm layer (nothing to match).
    """
    layers = batch_norm_layers(teacher)
    if not layers:
        raise ConfigError(
            "data_free: DeepInversion matches the statistics stored in the teacher's batch-norm layers, and this "
            "teacher has none; train it with teacher.model.batch_norm: true"
        )
    was_training = teacher.training
    teacher.eval()
    requires = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    weights = [cfg.first_bn_multiplier] + [1.0] * (len(layers) - 1)
    hooks = _Statistics(layers)
    xs, ys, losses = [], [], []
    try:
        for b, start in enumerate(range(0, cfg.images, cfg.batch_size)):
            n = min(cfg.batch_size, cfg.images - start)
            targets = (torch.arange(start, start + n) % num_classes).to(device)
            x = torch.randn((n, *input_shape), generator=g).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
            for _ in range(cfg.steps):
                shift = (
                    torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=g).tolist()
                    if cfg.jitter
                    else [0, 0]
                )
                flip = cfg.flip and bool(torch.rand((), generator=g) < 0.5)
                view = torch.roll(x, shifts=tuple(shift), dims=(-2, -1)) if len(input_shape) >= 2 else x
                if flip and len(input_shape) >= 2:
                    view = torch.flip(view, dims=(-1,))
                opt.zero_grad(set_to_none=True)
                logits = teacher(view)
                parts = {
                    "ce": F.cross_entropy(logits.float(), targets),
                    "bn": hooks.loss(weights),
                    "tv": image_total_variation(view) if len(input_shape) >= 3 else torch.zeros(()),
                    "l2": image_l2(view),
                }
                total = (
                    parts["ce"]
                    + cfg.bn_weight * parts["bn"]
                    + cfg.tv_weight * parts["tv"]
                    + cfg.l2_weight * parts["l2"]
                )
                total.backward()
                opt.step()
            with torch.no_grad():
                final = {k: float(v) for k, v in parts.items()}
                final["teacher_accuracy"] = float((teacher(x).argmax(-1) == targets).float().mean() * 100)
            losses.append(final)
            xs.append(x.detach().cpu())
            ys.append(targets.cpu())
            if on_batch is not None:
                on_batch(b + 1, -(-cfg.images // cfg.batch_size), final)
    finally:
        hooks.close()
        for p, r in zip(teacher.parameters(), requires):
            p.requires_grad_(r)
        teacher.train(was_training)
    return torch.cat(xs), torch.cat(ys), losses


__all__ = ["DeepInversionConfig", "batch_norm_layers", "synthesize"]
