"""Step distillation of diffusion models: the parameterisations, the DDIM step and the students' targets.

Two families of samplers are covered.

*Variance-preserving diffusion* (DDPM/DDIM time steps, as in diffusers' schedulers): a clean sample
``x`` is noised as

    z_t = alpha_t * x + sigma_t * eps,    alpha_t^2 + sigma_t^2 = 1,    eps ~ N(0, I),

with ``alpha_t = sqrt(abar_t)`` read from a schedule's cumulative product ``abar`` (diffusers'
``alphas_cumprod``). A network may predict ``x``, ``eps`` or the velocity ``v = alpha_t eps - sigma_t x``
of "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, ICLR 2022); the
conversions between them, the deterministic DDIM step, the target that lets one student step replace two
teacher steps (that paper's Algorithm 2) and its truncated-SNR loss weighting are here.

*Consistency models* ("Consistency Models", Song, Dhariwal, Chen & Sutskever, ICML 2023) use EDM noise
levels ``x_sigma = x + sigma * eps`` on ``[sigma_min, sigma_max]``: the boundary-condition scalings
``c_skip``, ``c_out``, the Karras discretisation of the noise levels, and the distances of the
consistency-distillation loss, including the pseudo-Huber distance of "Improved Techniques for Training
Consistency Models" (Song & Dhariwal, ICLR 2024).

Conventions. Per-sample coefficients (``alpha``, ``sigma``) are ``[B]`` and broadcast over a batch of any
shape ``[B, ...]`` (``[B, C, H, W]`` for images); a 0-dim tensor or a float is the same for every sample.
The conversions and the DDIM step keep their inputs' dtype; the losses are computed in float32 for float32
and half inputs and in float64 for float64 inputs (references, gradcheck). Nothing here detaches the
teacher's side: pass ``target.detach()`` (or compute it under ``torch.no_grad()``) when it must not learn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distillery.functional._rows import check_reduction, compute_dtype, reduce_rows

# The floor of sigma^2 in the truncated-SNR weight: at sigma = 0 (clean data) the SNR is infinite.
SNR_SIGMA2_FLOOR = 1.0e-8

# "Improved Techniques for Training Consistency Models", section 3.3: c = 0.00054 * sqrt(d).
PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054


def _per_sample(coef: Tensor | float, like: Tensor) -> Tensor | float:
    """A ``[B]`` coefficient as ``[B, 1, ..., 1]``, to broadcast over ``like``'s ``[B, ...]``.

    Floats and 0-dim tensors are returned unchanged (they broadcast already); a tensor that has as many
    dims as ``like`` is taken as already shaped.
    """
    if not isinstance(coef, Tensor) or coef.dim() == 0 or coef.dim() == like.dim():
        return coef
    if coef.dim() != 1:
        raise ValueError(
            f"a per-sample coefficient must be [B] (or 0-dim); got {tuple(coef.shape)} for a batch "
            f"{tuple(like.shape)}"
        )
    if like.dim() == 0 or coef.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"a per-sample coefficient of shape {tuple(coef.shape)} does not match the batch "
            f"{tuple(like.shape)}: it needs one entry per sample (the first dimension)"
        )
    return coef.reshape(coef.shape[0], *([1] * (like.dim() - 1)))


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The signal and noise scales of integer time steps of a variance-preserving schedule.

        alpha_t = sqrt(abar_t),    sigma_t = sqrt(1 - abar_t)

    where ``abar`` is the cumulative product of ``1 - beta`` (diffusers' ``scheduler.alphas_cumprod``).
    From "Denoising Diffusion Probabilistic Models" (Ho, Jain & Abbeel, 2020), where
    ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``. Note that step 0 is *not* clean data
    (``abar_0 = 1 - beta_0 < 1``): for a step to clean data use ``alpha = 1, sigma = 0``, as diffusers'
    DDIM does with ``set_alpha_to_one``.

    Args:
        alphas_cumprod: ``[T]``, the schedule's ``abar_t`` for ``t = 0 .. T - 1``, in ``(0, 1]``.
        t: ``[B]`` (or any shape) integer time steps in ``[0, T)``.

    Returns:
        ``(alpha_t, sigma_t)``, each of ``t``'s shape and ``alphas_cumprod``'s dtype.

    Example:
        >>> alpha, sigma = alpha_sigma(torch.tensor([0.9999, 0.64, 0.36]), torch.tensor([1, 2]))
        >>> [round(a, 4) for a in alpha.tolist()], [round(s, 4) for s in sigma.tolist()]
        ([0.8, 0.6], [0.6, 0.8])
    """
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod must be a [T] schedule; got {tuple(alphas_cumprod.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"t must hold integer time steps; got dtype {t.dtype}")
    abar = alphas_cumprod[t.to(device=alphas_cumprod.device, dtype=torch.long)]
    return abar.sqrt(), (1.0 - abar).clamp_min(0.0).sqrt()


def v_target(x: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The velocity target of the v-parameterisation.

        v = alpha_t * eps - sigma_t * x

    From "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, 2022), section 4:
    with ``alpha_t = cos(phi)``, ``sigma_t = sin(phi)``, ``v = dz_t / dphi``.

    Args:
        x: ``[B, ...]`` clean samples.
        eps: ``[B, ...]`` the noise.
        alpha, sigma: ``[B]`` (or scalars), the scales of ``z_t = alpha x + sigma eps``.

    Returns:
        ``[B, ...]``.

    Example:
        >>> v_target(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([0.8]),
        ...          torch.tensor([0.6]))
        tensor([[-0.2000, -2.0000]])
    """
    return _per_sample(alpha, x) * eps - _per_sample(sigma, x) * x


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The clean sample implied by a velocity prediction.

        x = alpha_t * z_t - sigma_t * v

    (from ``z = alpha x + sigma eps``, ``v = alpha eps - sigma x`` and ``alpha^2 + sigma^2 = 1``).
    From "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, 2022), section 4.

    Args:
        z: ``[B, ...]`` the noisy sample ``z_t``.
        v: ``[B, ...]`` the (predicted) velocity.
        alpha, sigma: ``[B]`` (or scalars), variance preserving.

    Returns:
        ``[B, ...]``.

    Example:
        >>> x = x_from_v(torch.tensor([[1.1, 1.0]]), torch.tensor([[-0.2, -2.0]]), torch.tensor([0.8]),
        ...              torch.tensor([0.6]))  # v_target's example, inverted
        >>> [round(v, 4) for v in x[0].tolist()]
        [1.0, 2.0]
    """
    return _per_sample(alpha, z) * z - _per_sample(sigma, z) * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The noise implied by a velocity prediction.

        eps = sigma_t * z_t + alpha_t * v

    From "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, 2022), section 4
    (variance preserving: ``alpha^2 + sigma^2 = 1``).

    Args:
        z: ``[B, ...]`` the noisy sample ``z_t``.
        v: ``[B, ...]`` the (predicted) velocity.
        alpha, sigma: ``[B]`` (or scalars).

    Returns:
        ``[B, ...]``.

    Example:
        >>> eps_from_v(torch.tensor([[1.1, 1.0]]), torch.tensor([[-0.2, -2.0]]), torch.tensor([0.8]),
        ...            torch.tensor([0.6]))
        tensor([[ 0.5000, -1.0000]])
    """
    return _per_sample(sigma, z) * z + _per_sample(alpha, z) * v


def x_from_eps(z: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The clean sample implied by a noise prediction.

        x = (z_t - sigma_t * eps) / alpha_t

    From "Denoising Diffusion Implicit Models" (Song, Meng & Ermon, ICLR 2021), eq. 9 (its "predicted
    x_0"). Undefined at ``alpha_t = 0`` (pure noise), where an eps-prediction says nothing about ``x``: one
    reason Salimans & Ho move to the v- or x-parameterisation for distillation.

    Args:
        z: ``[B, ...]`` the noisy sample ``z_t``.
        eps: ``[B, ...]`` the (predicted) noise.
        alpha, sigma: ``[B]`` (or scalars), ``alpha > 0``.

    Returns:
        ``[B, ...]``.

    Example:
        >>> x = x_from_eps(torch.tensor([[1.1, 1.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([0.8]),
        ...                torch.tensor([0.6]))  # z = 0.8 x + 0.6 eps for x = (1, 2)
        >>> [round(v, 4) for v in x[0].tolist()]
        [1.0, 2.0]
    """
    return (z - _per_sample(sigma, z) * eps) / _per_sample(alpha, z)


def ddim_step(
    z_t: Tensor,
    x_pred: Tensor,
    alpha_t: Tensor | float,
    sigma_t: Tensor | float,
    alpha_s: Tensor | float,
    sigma_s: Tensor | float,
) -> Tensor:
    """One deterministic DDIM step (eta = 0) from time ``t`` to an earlier time ``s``.

        eps_hat = (z_t - alpha_t * x_pred) / sigma_t
        z_s     = alpha_s * x_pred + sigma_s * eps_hat

    From "Denoising Diffusion Implicit Models" (Song, Meng & Ermon, ICLR 2021), eq. 12 with
    ``sigma_t(eta) = 0``, written in ``alpha``/``sigma`` notation as in Salimans & Ho's Algorithm 2. The step
    to clean data is ``alpha_s = 1, sigma_s = 0`` (it returns ``x_pred``). ``sigma_t`` must be positive.

    Args:
        z_t: ``[B, ...]`` the current noisy sample.
        x_pred: ``[B, ...]`` the model's clean-sample prediction at ``(z_t, t)`` (:func:`x_from_v`,
            :func:`x_from_eps` convert other parameterisations).
        alpha_t, sigma_t: ``[B]`` (or scalars), the scales at ``t``.
        alpha_s, sigma_s: ``[B]`` (or scalars), the scales at ``s``.

    Returns:
        ``[B, ...]``, ``z_s``.

    Example:
        >>> ddim_step(torch.tensor([[1.1]]), torch.tensor([[1.0]]), torch.tensor([0.8]), torch.tensor([0.6]),
        ...           torch.tensor([0.96]), torch.tensor([0.28]))  # eps_hat = 0.5
        tensor([[1.1000]])
    """
    eps_hat = (z_t - _per_sample(alpha_t, z_t) * x_pred) / _per_sample(sigma_t, z_t)
    return _per_sample(alpha_s, z_t) * x_pred + _per_sample(sigma_s, z_t) * eps_hat


def progressive_distillation_target(
    z_t: Tensor,
    z_target: Tensor,
    alpha_t: Tensor | float,
    sigma_t: Tensor | float,
    alpha_target: Tensor | float,
    sigma_target: Tensor | float,
) -> Tensor:
    """The clean-sample target that makes one student DDIM step land where two teacher steps landed.

    The teacher takes two DDIM steps ``t -> t' -> t''`` from ``z_t`` and reaches ``z_t''`` (``z_target``).
    One student step from ``t`` with prediction ``x`` gives ``(sigma_t''/sigma_t) z_t + (alpha_t'' -
    (sigma_t''/sigma_t) alpha_t) x`` (:func:`ddim_step`); solving for ``x``:

        x_tilde = (z_t'' - (sigma_t''/sigma_t) * z_t) / (alpha_t'' - (sigma_t''/sigma_t) * alpha_t)

    From "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, 2022),
    Algorithm 2. When ``t''`` is clean data (``sigma_t'' = 0``, ``alpha_t'' = 1``) the ratio is exactly 0 and
    this is ``z_t'' / alpha_t''`` (the teacher's final sample itself); no special case is needed. The
    denominator equals ``(alpha_t'' sigma_t - sigma_t'' alpha_t) / sigma_t``, positive whenever ``t''`` has
    a higher signal-to-noise ratio than ``t`` (it is 0 for ``t'' = t``, where any ``x`` works).

    Args:
        z_t: ``[B, ...]`` the student's (and teacher's) starting point.
        z_target: ``[B, ...]`` where the teacher's two steps ended, ``z_t''``.
        alpha_t, sigma_t: ``[B]`` (or scalars), the scales at ``t``, ``sigma_t > 0``.
        alpha_target, sigma_target: ``[B]`` (or scalars), the scales at ``t''``.

    Returns:
        ``[B, ...]``, ``x_tilde`` (the student's regression target; convert it to a v- or eps-target with
        :func:`v_target` and ``eps = (z_t - alpha_t x_tilde) / sigma_t`` if the student predicts those).

    Example:
        >>> z_t, z_target = torch.tensor([[1.1]]), torch.tensor([[1.1]])  # ddim_step's example, reversed
        >>> x = progressive_distillation_target(z_t, z_target, torch.tensor([0.8]), torch.tensor([0.6]),
        ...                                     torch.tensor([0.96]), torch.tensor([0.28]))
        >>> round(x.item(), 4)
        1.0
    """
    ratio = _per_sample(sigma_target, z_t) / _per_sample(sigma_t, z_t)
    return (z_target - ratio * z_t) / (_per_sample(alpha_target, z_t) - ratio * _per_sample(alpha_t, z_t))


def snr_truncated_weight(
    alpha: Tensor | float, sigma: Tensor | float, *, sigma2_floor: float = SNR_SIGMA2_FLOOR
) -> Tensor:
    """The "truncated SNR" loss weight of progressive distillation.

        w(alpha, sigma) = max(alpha^2 / max(sigma^2, sigma2_floor), 1)

    From "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho, 2022), section 4:
    the x-space error weighted by ``max(SNR, 1)`` equals ``max(||x - x_hat||^2, ||eps - eps_hat||^2)``, so
    the loss neither vanishes at high noise (SNR -> 0, where plain SNR weighting would give 0) nor explodes
    at low noise. At ``sigma = 0`` the SNR is infinite; this floors ``sigma^2`` at ``sigma2_floor`` (default
    1e-8), so the weight there is the large but finite ``alpha^2 / sigma2_floor`` (1e8 for ``alpha = 1``) and
    never inf or NaN. The floor is below every ``sigma^2 = 1 - abar_t`` of the usual schedules (diffusers'
    linear schedule starts at ``1e-4``), where it changes nothing.

    Args:
        alpha, sigma: ``[B]`` (or scalars), the scales of the noised input.
        sigma2_floor: the floor of ``sigma^2``, > 0.

    Returns:
        ``[B]`` (a 0-dim tensor for scalars), float32 (float64 for float64 inputs).

    Example:
        >>> snr_truncated_weight(torch.tensor([0.96, 0.6, 1.0]), torch.tensor([0.28, 0.8, 0.0]))
        tensor([1.1755e+01, 1.0000e+00, 1.0000e+08])
    """
    if not sigma2_floor > 0:
        raise ValueError(f"sigma2_floor must be > 0; got {sigma2_floor}")
    device = next((c.device for c in (alpha, sigma) if isinstance(c, Tensor)), None)
    alpha, sigma = torch.as_tensor(alpha, device=device), torch.as_tensor(sigma, device=device)
    dtype = torch.float64 if torch.float64 in (alpha.dtype, sigma.dtype) else torch.float32
    alpha, sigma = alpha.to(dtype), sigma.to(dtype)
    snr = alpha.square() / sigma.square().clamp_min(sigma2_floor)
    return snr.clamp_min(1.0)


def _per_sample_mean(diff2: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[B]``: the mean over every non-batch dim (``[B]`` inputs are their own mean)."""
    return diff2.reshape(diff2.shape[0], -1).mean(-1)


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have one shape")
    if a.dim() == 0:
        raise ValueError(f"{names[0]} needs a batch dimension [B, ...]; got a 0-dim tensor")


def _check_weight(weight: Tensor, batch: int, what: str) -> None:
    if weight.shape not in ((batch,), ()):
        raise ValueError(f"{what} must be [B] = [{batch}] (or 0-dim); got {tuple(weight.shape)}")


def progressive_distillation_loss(
    x_pred: Tensor,
    x_target: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    reduction: str = "mean",
) -> Tensor:
    """The student's loss in progressive distillation: truncated-SNR-weighted x-space squared error.

        l_b = w(alpha_b, sigma_b) * (1 / D) * sum_j (x_pred[b, j] - x_target[b, j])^2,
        w   = max(alpha^2 / sigma^2, 1)                       (:func:`snr_truncated_weight`)

    and the mean over the batch. From "Progressive Distillation for Fast Sampling of Diffusion Models"
    (Salimans & Ho, 2022), Algorithm 2 with the truncated-SNR weighting of section 4. The squared error is
    *averaged* over the ``D`` non-batch elements (pixels and channels), where the paper writes the squared
    norm (a sum): the two differ by the constant factor ``D``, which only rescales the learning rate.

    Args:
        x_pred: ``[B, ...]`` the student's clean-sample prediction at ``(z_t, t)``.
        x_target: ``[B, ...]`` the target of :func:`progressive_distillation_target` (not detached here).
        alpha, sigma: ``[B]`` (or scalars), the scales at the student's time ``t``.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``[B]``).

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``; float32 (float64 for float64 inputs).

    Example:
        >>> x_pred, x_target = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
        >>> progressive_distillation_loss(x_pred, x_target, torch.tensor([0.96, 0.6]),
        ...                               torch.tensor([0.28, 0.8]), reduction="none")  # w = (11.755, 1)
        tensor([23.5102,  1.0000])
    """
    check_reduction(reduction)
    _check_pair(x_pred, x_target, ("x_pred", "x_target"))
    dtype = compute_dtype(x_pred)
    per_sample = _per_sample_mean((x_pred.to(dtype) - x_target.to(dtype)).square())
    weight = snr_truncated_weight(alpha, sigma).to(device=per_sample.device, dtype=dtype)
    _check_weight(weight, per_sample.shape[0], "the weight's alpha and sigma")
    return reduce_rows(weight * per_sample, None, x_pred.shape[:1], reduction, None)


def consistency_skip_out(
    sigma: Tensor | float, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor]:
    """The skip and output scalings of a consistency model, ``f(x, sigma) = c_skip x + c_out F(x, sigma)``.

        c_skip(sigma) = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
        c_out(sigma)  = sigma_data * (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)

    From "Consistency Models" (Song, Dhariwal, Chen & Sutskever, 2023), Appendix C (EDM's scalings shifted
    so that ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``: the boundary condition
    ``f(x, sigma_min) = x`` holds for any network ``F``). ``sigma_min`` is the paper's ``epsilon``.

    Args:
        sigma: ``[B]`` (or any shape, or a float), EDM noise levels ``>= sigma_min``.
        sigma_data: the data's standard deviation (0.5 for images in ``[-1, 1]``).
        sigma_min: the smallest noise level.

    Returns:
        ``(c_skip, c_out)``, each of ``sigma``'s shape (a float gives 0-dim float64 tensors); reshape to
        ``[B, 1, 1, 1]`` to scale images.

    Example:
        >>> c_skip, c_out = consistency_skip_out(torch.tensor([0.002, 0.502]))
        >>> [round(v, 4) for v in c_skip.tolist()], [round(v, 4) for v in c_out.tolist()]
        ([1.0, 0.5], [0.0, 0.3528])
    """
    sigma = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted.square() + sigma_data**2)
    c_out = sigma_data * shifted / (sigma.square() + sigma_data**2).sqrt()
    return c_skip, c_out


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` increasing noise levels from ``sigma_min`` to ``sigma_max``, evenly spaced in ``sigma^(1/rho)``.

        sigma_i = (sigma_min^(1/rho) + i / (n - 1) * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
        i = 0 .. n - 1

    From "Elucidating the Design Space of Diffusion-Based Generative Models" (Karras et al., 2022), eq. 5,
    as used for the discretisation of "Consistency Models" (Song et al., 2023), section 5 (``t_i`` with
    ``rho = 7``). The order is increasing (the consistency-models convention, ``sigma_0 = sigma_min``); EDM
    and k-diffusion's samplers list the same levels decreasing and append 0. Computed in float64; the
    endpoints are exactly ``sigma_min`` and ``sigma_max``.

    Args:
        n: the number of levels, ``>= 2``.
        sigma_min, sigma_max: ``0 < sigma_min < sigma_max``.
        rho: the spacing exponent, ``> 0`` (larger puts more levels at low noise).
        dtype, device: of the result (default: torch's default dtype, the CPU).

    Returns:
        ``[n]``.

    Example:
        >>> [round(v, 4) for v in karras_sigmas(3, 0.002, 80.0).tolist()]
        [0.002, 2.5152, 80.0]
    """
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 levels; got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.to(dtype=dtype or torch.get_default_dtype(), device=device)


def pseudo_huber(x: Tensor, y: Tensor, c: Tensor | float) -> Tensor:
    """The pseudo-Huber distance per sample, over all non-batch dims.

        d(x, y) = sqrt(||x - y||_2^2 + c^2) - c

    From "Improved Techniques for Training Consistency Models" (Song & Dhariwal, 2023), section 3.3: it is
    about ``||x - y||^2 / (2c)`` for ``||x - y|| << c`` and ``||x - y|| - c`` for large differences, so it
    is smooth like the squared error but less sensitive to outliers. Computed as the algebraically equal
    ``||x - y||^2 / (sqrt(||x - y||^2 + c^2) + c)``, which has no cancellation for small differences and a
    finite (zero) gradient at ``x = y``.

    Args:
        x, y: ``[B, ...]``, one shape.
        c: ``> 0``, a float, a 0-dim tensor or ``[B]``.

    Returns:
        ``[B]``, float32 (float64 for float64 inputs).

    Example:
        >>> pseudo_huber(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2), 1.0)  # sqrt(26) - 1, 0
        tensor([4.0990, 0.0000])
    """
    _check_pair(x, y, ("x", "y"))
    if not isinstance(c, Tensor) and not c > 0:
        raise ValueError(f"the pseudo-Huber constant c must be > 0; got {c}")
    dtype = compute_dtype(x)
    sq = (x.to(dtype) - y.to(dtype)).square().reshape(x.shape[0], -1).sum(-1)  # (B,)
    if isinstance(c, Tensor):
        _check_weight(c, x.shape[0], "c")
        c = c.to(device=sq.device, dtype=dtype)
    return sq / ((sq + c * c).sqrt() + c)


def consistency_distillation_loss(
    student_out: Tensor,
    target_out: Tensor,
    distance: str = "l2",
    c: Tensor | float | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The consistency-distillation loss: the distance between the student at one noise level and the target
    network at the adjacent, less noisy one.

        l_b = lambda_b * d(f_theta(x_{sigma_{n+1}}, sigma_{n+1}), f_theta^-(x_hat_{sigma_n}, sigma_n))

    averaged over the batch, where ``x_hat_{sigma_n}`` is one ODE-solver step of the teacher from
    ``x_{sigma_{n+1}}``. From "Consistency Models" (Song, Dhariwal, Chen & Sutskever, 2023), eq. 7. The
    distances:

    * ``"l2"``: the squared error *averaged* over the ``D`` non-batch elements,
      ``(1/D) sum_j (s_j - t_j)^2`` (the paper's ``||.||_2^2`` up to the constant ``D``);
    * ``"pseudo_huber"``: :func:`pseudo_huber` with ``c`` defaulting to ``0.00054 * sqrt(D)``, from
      "Improved Techniques for Training Consistency Models" (Song & Dhariwal, 2023), section 3.3.

    (The papers' LPIPS distance needs a network and is not here.)

    Args:
        student_out: ``[B, ...]`` the student's outputs ``f_theta`` (with its ``c_skip``/``c_out`` applied,
            :func:`consistency_skip_out`).
        target_out: ``[B, ...]`` the target network's outputs (not detached here: pass ``.detach()``, the
            papers' stop-gradient).
        distance: ``"l2"`` or ``"pseudo_huber"``.
        c: the pseudo-Huber constant (ignored by ``"l2"``); a float, 0-dim or ``[B]`` tensor.
        weight: ``[B]`` the papers' ``lambda(sigma_n)`` (e.g. ``1 / (sigma_{n+1} - sigma_n)`` in the improved
            techniques); default 1.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``[B]``).

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``; float32 (float64 for float64 inputs).

    Example:
        >>> s, t = torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([[1.0, 1.0], [2.0, 1.0]])
        >>> consistency_distillation_loss(s, t)  # (2 + 0.5) / 2
        tensor(1.2500)
        >>> consistency_distillation_loss(s, t, distance="pseudo_huber", c=1.0, reduction="none")
        tensor([1.2361, 0.4142])
    """
    check_reduction(reduction)
    _check_pair(student_out, target_out, ("student_out", "target_out"))
    dtype = compute_dtype(student_out)
    if distance == "l2":
        per_sample = _per_sample_mean((student_out.to(dtype) - target_out.to(dtype)).square())
    elif distance == "pseudo_huber":
        if c is None:
            c = PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(student_out[0].numel())
        per_sample = pseudo_huber(student_out, target_out, c)
    else:
        raise ValueError(f"distance must be 'l2' or 'pseudo_huber'; got {distance!r}")
    if weight is not None:
        _check_weight(weight, per_sample.shape[0], "weight")
        per_sample = weight.to(device=per_sample.device, dtype=dtype) * per_sample
    return reduce_rows(per_sample, None, student_out.shape[:1], reduction, None)


__all__ = [
    "alpha_sigma",
    "consistency_distillation_loss",
    "consistency_skip_out",
    "ddim_step",
    "eps_from_v",
    "karras_sigmas",
    "progressive_distillation_loss",
    "progressive_distillation_target",
    "pseudo_huber",
    "snr_truncated_weight",
    "v_target",
    "x_from_eps",
    "x_from_v",
]
