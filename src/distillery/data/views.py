"""Views of an image batch for self-supervised distillation: multi-crop, photometric noise, masks.

:func:`make_views` turns images ``[B, C, H, W]`` (values in [0, 1]) into the views DINO-family
methods train on: ``global_crops`` large crops and ``local_crops`` small ones (random resized crops,
"Emerging Properties in Self-Supervised Vision Transformers"), each flipped, colour-jittered,
blurred and solarised at random, and, for masked image modelling (iBOT, data2vec), a mask over the
patch grid of each global view (random patches or blocks, "BEiT: BERT Pre-Training of Image
Transformers").

Every random choice for sample ``i`` at training step ``t`` comes from a generator seeded with
``(seed, sample id, t)``, so a view depends only on those three numbers: the same on any number of
processes, in any batch composition, and after resuming. Crops and blur are kornia's
(``kornia.geometry.transform.crop_and_resize``, ``kornia.filters.gaussian_blur2d``,
``kornia.enhance.solarize``); the parameters are drawn here, per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distillery.configbase import StrictModel
from distillery.errors import ConfigError

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, sample: int, step: int) -> int:
    """A 63-bit seed from ``(seed, sample id, step)`` (splitmix64 over the three): distinct triples give
    unrelated generators."""
    z = 0
    for value in (seed, sample, step):
        z = (z + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


class ViewsConfig(StrictModel):
    """How the views of each training image are drawn (DINO's multi-crop, scaled to small images)."""

    global_crops: int = Field(2, ge=0, description="number of large crops (the teacher sees these)")
    global_size: int | None = Field(
        None, ge=1, description="side of a global crop in pixels (null: the image's)"
    )
    global_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="range of the crop's area as a fraction of the image (DINO: 0.4-1)"
    )
    local_crops: int = Field(0, ge=0, description="number of small crops (the student only)")
    local_size: int | None = Field(None, ge=1, description="side of a local crop (null: half the image's)")
    local_scale: tuple[float, float] = Field(
        (0.05, 0.4), description="area range of a local crop (DINO: 0.05-0.4)"
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    jitter: float = Field(0.8, ge=0.0, le=1.0, description="probability of brightness/contrast jitter")
    brightness: float = Field(0.4, ge=0.0, lt=1.0, description="brightness factor drawn from 1 +- this")
    contrast: float = Field(0.4, ge=0.0, lt=1.0, description="contrast factor drawn from 1 +- this")
    blur: list[float] = Field(
        default_factory=lambda: [1.0, 0.1],
        description="blur probability of global crop 1, 2, ... (the last value repeats; DINO: 1.0, 0.1)",
    )
    local_blur: float = Field(0.5, ge=0.0, le=1.0, description="blur probability of a local crop")
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="range of the Gaussian blur's sigma (pixels)"
    )
    solarize: list[float] = Field(
        default_factory=lambda: [0.0, 0.2],
        description="solarisation probability of global crop 1, 2, ... (last repeats; DINO: 0, 0.2)",
    )
    mask: Literal["none", "random", "block"] = Field(
        "none",
        description="mask patches of the global crops (iBOT, data2vec): none, random patches or blocks",
    )
    mask_ratio: tuple[float, float] = Field(
        (0.1, 0.5), description="range of the masked fraction of patches (iBOT: 0.3 +- 0.2)"
    )
    mask_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="fraction of global crops that are masked at all (iBOT: 0.5)"
    )
    patch_size: int = Field(
        4, ge=1, description="side of a patch of the mask grid (the backbone's patch size)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ViewsConfig:
        for name in ("global_scale", "local_scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name != "blur_sigma" and hi > 1):
                bound = "0 < low <= high" + ("" if name == "blur_sigma" else " <= 1")
                raise ValueError(f"{name} must satisfy {bound}; got ({lo}, {hi})")
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"mask_ratio must satisfy 0 <= low <= high < 1; got ({lo}, {hi})")
        if self.local_crops > 0 and self.global_crops == 0:
            raise ValueError(
                f"local_crops={self.local_crops} with global_crops=0: the teacher's targets come from the global "
                "crops; set global_crops to 1 or more"
            )
        for name in ("blur", "solarize"):
            values = getattr(self, name)
            if not values or any(not 0 <= p <= 1 for p in values):
                raise ValueError(f"{name} must be a non-empty list of probabilities in [0, 1]; got {values}")
        return self

    def sizes(self, image: int) -> tuple[int, int]:
        """``(global side, local side)`` for images of side ``image``."""
        return self.global_size or image, self.local_size or max(1, image // 2)

    def check(self, height: int, width: int, what: str = "data.views") -> None:
        """Errors for crops larger than the image and patch sizes that do not divide a masked crop."""
        g, loc = self.sizes(min(height, width))
        for name, side, n in (("global_size", g, self.global_crops), ("local_size", loc, self.local_crops)):
            if n and side > min(height, width):
                raise ConfigError(
                    f"{what}.{name}={side} is larger than the {height}x{width} images; choose at most "
                    f"{min(height, width)}"
                )
        if self.mask != "none" and g % self.patch_size:
            raise ConfigError(
                f"{what}.patch_size={self.patch_size} does not divide the global crop side {g}; choose a patch size "
                f"that divides it (e.g. {_divisor_near(g, self.patch_size)})"
            )


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


@dataclass
class Views:
    """The views of one batch. ``global_views``: ``[G, B, C, S, S]``; ``local_views``: ``[L, B, C, s, s]``
    (``L`` may be 0); ``masks``: ``[G, B, P]`` booleans over each global view's patches (True = masked),
    or None when masking is off."""

    global_views: Tensor
    local_views: Tensor
    masks: Tensor | None = None

    def all_views(self) -> list[Tensor]:
        """Every view, global ones first: the student's inputs, in the order DINO pairs them."""
        return [*self.global_views, *self.local_views]


def _crop_box(
    g: torch.Generator, h: int, w: int, scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A random resized crop ``(x0, y0, x1, y1)`` (inclusive pixel corners): area fraction in ``scale``,
    log-uniform aspect ratio in [3/4, 4/3], ten tries, then the largest centred crop in range."""
    area = h * w
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        ratio = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=g).item())
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
            y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
            return x0, y0, x0 + cw - 1, y0 + ch - 1
    side = min(h, w, max(1, round(math.sqrt(area * scale[1]))))
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side - 1, y0 + side - 1


def _mask(g: torch.Generator, rows: int, cols: int, ratio: float, kind: str) -> Tensor:
    """``[rows * cols]`` booleans with exactly ``round(ratio * rows * cols)`` True: random patches, or
    rectangles of random area and aspect (BEiT's block masking) topped up with random patches."""
    total = rows * cols
    target = round(ratio * total)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if kind == "block":
        for _ in range(10 * total):
            left = target - int(mask.sum())
            if left <= 0:
                break
            area = 1 + torch.rand((), generator=g).item() * (left - 1)
            aspect = math.exp((torch.rand((), generator=g).item() * 2 - 1) * math.log(1 / 0.3))
            bh = max(1, min(rows, round(math.sqrt(area * aspect))))
            bw = max(1, min(cols, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, rows - bh + 1, (), generator=g))
            lft = int(torch.randint(0, cols - bw + 1, (), generator=g))
            block = mask[top : top + bh, lft : lft + bw]
            if int((~block).sum()) <= left:
                block.fill_(True)
    flat = mask.flatten()
    left = target - int(flat.sum())
    if left > 0:
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=g)[:left]]] = True
    return flat


def make_views(images: Tensor, sample_ids: Tensor, step: int, seed: int, cfg: ViewsConfig) -> Views:
    """The views of ``images`` ``[B, C, H, W]`` (in [0, 1]) at training ``step``: see the module doc.

    Args:
        images: the batch, values in [0, 1].
        sample_ids: ``[B]`` each image's id in its dataset (with ``step`` and ``seed``, it fixes the views).
        step: the training step.
        seed: the run's seed.
        cfg: the views to draw.
    """
    from kornia.enhance import solarize
    from kornia.filters import gaussian_blur2d
    from kornia.geometry.transform import crop_and_resize

    if images.dim() != 4:
        raise ValueError(f"views need image batches [B, C, H, W]; got shape {list(images.shape)}")
    b, _, h, w = images.shape
    cfg.check(h, w)
    g_side, l_side = cfg.sizes(min(h, w))
    kinds = [("global", i) for i in range(cfg.global_crops)] + [("local", i) for i in range(cfg.local_crops)]
    # per view: boxes [B, 4, 2], flip, jitter factors, blur sigma (0 = none), solarise, mask
    boxes = torch.zeros(len(kinds), b, 4, 2)
    flags = torch.zeros(len(kinds), b, 3, dtype=torch.bool)  # flip, blur, solarise
    factors = torch.ones(len(kinds), b, 2)  # brightness, contrast
    sigma = torch.ones(len(kinds), b)
    rows = cols = g_side // cfg.patch_size
    masks = torch.zeros(cfg.global_crops, b, rows * cols, dtype=torch.bool) if cfg.mask != "none" else None
    for j, sid in enumerate(sample_ids.tolist()):
        gen = torch.Generator().manual_seed(sample_seed(seed, int(sid), step))
        for v, (kind, i) in enumerate(kinds):
            scale = cfg.global_scale if kind == "global" else cfg.local_scale
            x0, y0, x1, y1 = _crop_box(gen, h, w, scale)
            boxes[v, j] = torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float32)
            u = torch.rand(6, generator=gen)
            p_blur = cfg.blur[min(i, len(cfg.blur) - 1)] if kind == "global" else cfg.local_blur
            p_sol = cfg.solarize[min(i, len(cfg.solarize) - 1)] if kind == "global" else 0.0
            flags[v, j] = torch.tensor([bool(u[0] < cfg.hflip), bool(u[1] < p_blur), bool(u[2] < p_sol)])
            if u[3] < cfg.jitter:
                factors[v, j, 0] = 1 + cfg.brightness * (2 * u[4] - 1)
                factors[v, j, 1] = 1 + cfg.contrast * (2 * u[5] - 1)
            lo, hi = cfg.blur_sigma
            sigma[v, j] = lo + (hi - lo) * torch.rand((), generator=gen)
            if masks is not None and kind == "global":
                r = torch.rand(2, generator=gen)
                if r[0] < cfg.mask_probability:
                    ratio = cfg.mask_ratio[0] + (cfg.mask_ratio[1] - cfg.mask_ratio[0]) * r[1].item()
                    masks[i, j] = _mask(gen, rows, cols, ratio, cfg.mask)
    x = images.float()
    out = []
    for v, (kind, _) in enumerate(kinds):
        side = g_side if kind == "global" else l_side
        view = crop_and_resize(x, boxes[v].to(x.device), (side, side), align_corners=True)
        view = torch.where(flags[v, :, 0].to(x.device)[:, None, None, None], view.flip(-1), view)
        bright, contrast = (f.to(x.device)[:, None, None, None] for f in factors[v].unbind(-1))
        view = (view * bright).clamp(0, 1)
        mean = view.mean(dim=(1, 2, 3), keepdim=True)
        view = ((view - mean) * contrast + mean).clamp(0, 1)
        if flags[v, :, 1].any():
            k = max(3, (side // 10) | 1)  # an odd kernel about a tenth of the side (DINO: 23 at 224)
            s = sigma[v].to(x.device)[:, None].expand(-1, 2).contiguous()
            blurred = gaussian_blur2d(view, (k, k), s)
            view = torch.where(flags[v, :, 1].to(x.device)[:, None, None, None], blurred, view)
        if flags[v, :, 2].any():
            view = torch.where(flags[v, :, 2].to(x.device)[:, None, None, None], solarize(view, 0.5), view)
        out.append(view.to(images.dtype))
    n_glob = cfg.global_crops
    empty_local = images.new_zeros(0, b, images.shape[1], l_side, l_side)
    global_views = (
        torch.stack(out[:n_glob]) if n_glob else images.new_zeros(0, b, images.shape[1], g_side, g_side)
    )
    local_views = torch.stack(out[n_glob:]) if cfg.local_crops else empty_local
    return Views(global_views, local_views, None if masks is None else masks.to(images.device))


class NoiseConfig(StrictModel):
    """One randomly perturbed view of each image: the input noise of a semi-supervised student or
    teacher (FixMatch's weak and strong views, Mean Teacher's and Noisy Student's input noise). The
    crop, flip and photometric parts are :func:`make_views` with one global crop; cutout and Gaussian
    noise come after, from the same per-sample generator."""

    crop_scale: tuple[float, float] = Field(
        (1.0, 1.0), description="area range of a random resized crop (1, 1: the whole image)"
    )
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")
    jitter: float = Field(0.0, ge=0.0, le=1.0, description="probability of brightness/contrast jitter")
    brightness: float = Field(0.4, ge=0.0, lt=1.0, description="brightness factor drawn from 1 +- this")
    contrast: float = Field(0.4, ge=0.0, lt=1.0, description="contrast factor drawn from 1 +- this")
    blur: float = Field(0.0, ge=0.0, le=1.0, description="probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.1, 1.0), description="range of the blur's sigma (pixels)")
    solarize: float = Field(0.0, ge=0.0, le=1.0, description="probability of solarisation")
    cutout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="side of a square set to 0.5, as a fraction of the image (FixMatch: 0.5)",
    )
    noise: float = Field(0.0, ge=0.0, description="std of additive Gaussian noise")

    def views(self) -> ViewsConfig:
        return ViewsConfig(
            global_crops=1,
            global_scale=self.crop_scale,
            hflip=self.hflip,
            jitter=self.jitter,
            brightness=self.brightness,
            contrast=self.contrast,
            blur=[self.blur],
            blur_sigma=self.blur_sigma,
            solarize=[self.solarize],
        )

    def is_identity(self) -> bool:
        return (
            self.crop_scale == (1.0, 1.0)
            and self.hflip == self.jitter == self.blur == self.solarize == self.cutout == self.noise == 0.0
        )


# the cutout/noise generator of a sample is seeded apart from its crop generator
_NOISE_SALT = 0x5EED


def noisy_view(images: Tensor, sample_ids: Tensor, step: int, seed: int, cfg: NoiseConfig) -> Tensor:
    """One view ``[B, C, H, W]`` of ``images`` under ``cfg``, a function of ``(seed, sample id, step)``
    like :func:`make_views` (give the student and the teacher different seeds for different noise)."""
    if images.dim() != 4:
        raise ValueError(f"views need image batches [B, C, H, W]; got shape {list(images.shape)}")
    if cfg.is_identity():
        return images
    x = make_views(images, sample_ids, step, seed, cfg.views()).global_views[0]
    b, _, h, w = x.shape
    if cfg.cutout == 0 and cfg.noise == 0:
        return x
    keep = torch.ones(b, 1, h, w, dtype=x.dtype)
    noise = torch.zeros(b, *x.shape[1:], dtype=x.dtype)
    side = max(1, round(cfg.cutout * min(h, w)))
    for j, sid in enumerate(sample_ids.tolist()):
        gen = torch.Generator().manual_seed(sample_seed(seed ^ _NOISE_SALT, int(sid), step))
        if cfg.cutout > 0:  # a square centred anywhere in the image, clipped at the border (as Cutout)
            cy, cx = (int(torch.randint(0, n, (), generator=gen)) for n in (h, w))
            keep[
                j,
                :,
                max(0, cy - side // 2) : cy + (side + 1) // 2,
                max(0, cx - side // 2) : cx + (side + 1) // 2,
            ] = 0
        if cfg.noise > 0:
            noise[j] = cfg.noise * torch.randn(x.shape[1:], generator=gen, dtype=x.dtype)
    keep, noise = keep.to(x.device), noise.to(x.device)
    return x * keep + 0.5 * (1 - keep) + noise


__all__ = ["NoiseConfig", "Views", "ViewsConfig", "make_views", "noisy_view", "sample_seed"]
