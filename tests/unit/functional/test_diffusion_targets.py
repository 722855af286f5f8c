"""Step-distillation maths of diffusion models against float64 loops written from the papers' equations.

The references below work on Python floats element by element (no vectorised torch maths); the tensors
are only reshaped into per-sample lists and back. The key property of progressive distillation is checked
on a fixed, non-linear "teacher": one DDIM step with the distillation target lands exactly where two
teacher DDIM steps landed, also when the second step ends at clean data.
"""

from __future__ import annotations

import math

import pytest
import torch

from distillery.functional.diffusion import (
    alpha_sigma,
    consistency_distillation_loss,
    consistency_skip_out,
    ddim_step,
    eps_from_v,
    karras_sigmas,
    progressive_distillation_loss,
    progressive_distillation_target,
    pseudo_huber,
    snr_truncated_weight,
    v_target,
    x_from_eps,
    x_from_v,
)

SHAPES = [(3,), (4, 5), (2, 3, 4, 4), (2, 1, 3, 2, 2)]


# ---------------------------------------------------------------- helpers and loop references


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=gen(seed))


def angles(batch: int, seed: int, lo: float = 0.05, hi: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving ``(alpha, sigma) = (cos phi, sin phi)`` for random ``phi`` in ``[lo, hi]``."""
    phi = lo + (hi - lo) * torch.rand(batch, dtype=torch.float64, generator=gen(seed))
    return phi.cos(), phi.sin()


def per_sample(t: torch.Tensor) -> list[list[float]]:
    """``[B, ...]`` -> one flat list of floats per sample (``[B]`` -> one-element lists)."""
    return [t[b].reshape(-1).tolist() for b in range(t.shape[0])]


def back(rows: list[list[float]], shape) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(shape)


def loop_elementwise(fn, shape, *tensors, coefs):
    """Apply ``fn(*elements, *coefficients_of_the_sample)`` to every element, sample by sample."""
    rows = [per_sample(t) for t in tensors]
    out = []
    for b in range(shape[0]):
        cb = [float(c[b]) for c in coefs]
        out.append([fn(*(r[b][j] for r in rows), *cb) for j in range(len(rows[0][b]))])
    return back(out, shape)


def ref_v(x, e, a, s):
    return a * e - s * x


def ref_x_from_v(z, v, a, s):
    return a * z - s * v


def ref_eps_from_v(z, v, a, s):
    return s * z + a * v


def ref_x_from_eps(z, e, a, s):
    return (z - s * e) / a


def ref_ddim(z, x, at, st, as_, ss):
    e = (z - at * x) / st
    return as_ * x + ss * e


def ref_pd_target(z, zt, at, st, a2, s2):
    r = s2 / st
    return (zt - r * z) / (a2 - r * at)


def ref_weight(a: float, s: float, floor: float = 1e-8) -> float:
    return max(a * a / max(s * s, floor), 1.0)


def ref_mse(row_a: list[float], row_b: list[float]) -> float:
    return math.fsum((p - q) ** 2 for p, q in zip(row_a, row_b)) / len(row_a)


def ref_pseudo_huber(row_a: list[float], row_b: list[float], c: float) -> float:
    sq = math.fsum((p - q) ** 2 for p, q in zip(row_a, row_b))
    return math.sqrt(sq + c * c) - c


def reduce(values: list[float], reduction: str):
    if reduction == "none":
        return values
    total = math.fsum(values)
    return total if reduction == "sum" else total / len(values)


# ---------------------------------------------------------------- schedule and parameterisations


def test_alpha_sigma_reads_a_linear_ddpm_schedule():
    T = 1000
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar, run = [], 1.0
    for beta in betas:
        run *= 1.0 - beta
        abar.append(run)
    t = torch.tensor([0, 1, 250, 999, 500, 0])
    alpha, sigma = alpha_sigma(torch.tensor(abar, dtype=torch.float64), t)
    assert alpha.shape == sigma.shape == (6,) and alpha.dtype == torch.float64
    for i, step in enumerate(t.tolist()):
        assert alpha[i].item() == pytest.approx(math.sqrt(abar[step]), abs=1e-15)
        assert sigma[i].item() == pytest.approx(math.sqrt(1.0 - abar[step]), abs=1e-15)
        assert alpha[i].item() ** 2 + sigma[i].item() ** 2 == pytest.approx(1.0, abs=1e-14)
    # the schedule's own dtype is kept (diffusers stores float32)
    a32, _ = alpha_sigma(torch.tensor(abar, dtype=torch.float32), t)
    assert a32.dtype == torch.float32


def test_alpha_sigma_rejects_bad_inputs():
    with pytest.raises(ValueError, match="integer"):
        alpha_sigma(torch.tensor([0.9, 0.5]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[T\]"):
        alpha_sigma(torch.ones(2, 2), torch.tensor([0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_conversions_match_loops(shape):
    seed = sum(shape)
    x, eps, z, v = randn(shape, seed), randn(shape, seed + 1), randn(shape, seed + 2), randn(shape, seed + 3)
    alpha, sigma = angles(shape[0], seed + 4)
    cases = [
        (v_target(x, eps, alpha, sigma), ref_v, (x, eps)),
        (x_from_v(z, v, alpha, sigma), ref_x_from_v, (z, v)),
        (eps_from_v(z, v, alpha, sigma), ref_eps_from_v, (z, v)),
        (x_from_eps(z, eps, alpha, sigma), ref_x_from_eps, (z, eps)),
    ]
    for got, ref, inputs in cases:
        want = loop_elementwise(ref, shape, *inputs, coefs=(alpha, sigma))
        assert got.shape == shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step_and_target_match_loops(shape):
    seed = 7 * len(shape)
    z, x, z2 = randn(shape, seed), randn(shape, seed + 1), randn(shape, seed + 2)
    a_t, s_t = angles(shape[0], seed + 3, lo=0.8, hi=1.5)
    a_s, s_s = angles(shape[0], seed + 4, lo=0.05, hi=0.7)
    got = ddim_step(z, x, a_t, s_t, a_s, s_s)
    torch.testing.assert_close(got, loop_elementwise(ref_ddim, shape, z, x, coefs=(a_t, s_t, a_s, s_s)))
    got = progressive_distillation_target(z, z2, a_t, s_t, a_s, s_s)
    want = loop_elementwise(ref_pd_target, shape, z, z2, coefs=(a_t, s_t, a_s, s_s))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_v_and_eps_round_trip(shape):
    seed = 3 + sum(shape)
    x, eps = randn(shape, seed), randn(shape, seed + 1)
    alpha, sigma = angles(shape[0], seed + 2)
    z = loop_elementwise(lambda xi, ei, a, s: a * xi + s * ei, shape, x, eps, coefs=(alpha, sigma))
    v = v_target(x, eps, alpha, sigma)
    torch.testing.assert_close(x_from_v(z, v, alpha, sigma), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_from_eps(z, eps, alpha, sigma), x, rtol=1e-12, atol=1e-12)
    # a DDIM step with the true x moves z along the same noise: z_s = alpha_s x + sigma_s eps
    a_s, s_s = angles(shape[0], seed + 3, lo=0.01, hi=0.04)
    z_s = ddim_step(z, x, alpha, sigma, a_s, s_s)
    want = loop_elementwise(lambda xi, ei, a, s: a * xi + s * ei, shape, x, eps, coefs=(a_s, s_s))
    torch.testing.assert_close(z_s, want, rtol=1e-12, atol=1e-12)


def test_scalar_coefficients_broadcast_and_shapes_are_checked():
    x, eps = randn((2, 3, 2, 2), 0), randn((2, 3, 2, 2), 1)
    torch.testing.assert_close(
        v_target(x, eps, 0.6, 0.8), v_target(x, eps, torch.full((2,), 0.6), torch.full((2,), 0.8))
    )
    torch.testing.assert_close(
        v_target(x, eps, torch.tensor(0.6), 0.8), v_target(x, eps, 0.6, torch.tensor(0.8))
    )
    with pytest.raises(ValueError, match="one entry per sample"):
        v_target(x, eps, torch.full((3,), 0.6), torch.full((3,), 0.8))
    with pytest.raises(ValueError, match=r"\[B\]"):
        v_target(x, eps, torch.full((2, 3), 0.6), 0.8)


# ---------------------------------------------------------------- the key property of Algorithm 2


class FixedTeacher:
    """A deterministic, non-linear x-predictor: per pixel, x_hat = tanh(A (1 + t) z + b) + 0.1 t z."""

    def __init__(self, channels: int, seed: int):
        self.A = randn((channels, channels), seed) / math.sqrt(channels)
        self.b = randn((channels,), seed + 1)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (1.0 + t).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("cd,bdhw->bchw", self.A, z) * scale + self.b.reshape(1, -1, 1, 1)
        return torch.tanh(mixed) + 0.1 * t.reshape(-1, 1, 1, 1) * z


def cosine(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous-time cosine schedule; exactly (1, 0) at t = 0."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


@pytest.mark.parametrize("steps", [1, 2, 4, 64])  # student steps N; the sample with i = 1 ends at t'' = 0
def test_one_student_step_with_the_target_equals_two_teacher_steps(steps):
    B, C = 5, 3
    teacher = FixedTeacher(C, seed=11 + steps)
    i = torch.tensor([1, 2, 3, 4, 1]).clamp(max=steps).to(torch.float64)
    t, t_mid, t_end = i / steps, (i - 0.5) / steps, (i - 1) / steps
    (a_t, s_t), (a_mid, s_mid), (a_end, s_end) = cosine(t), cosine(t_mid), cosine(t_end)
    x = randn((B, C, 4, 4), 5)
    z_t = a_t.reshape(-1, 1, 1, 1) * x + s_t.reshape(-1, 1, 1, 1) * randn((B, C, 4, 4), 6)

    z_mid = ddim_step(z_t, teacher(z_t, t), a_t, s_t, a_mid, s_mid)
    z_end = ddim_step(z_mid, teacher(z_mid, t_mid), a_mid, s_mid, a_end, s_end)
    x_tilde = progressive_distillation_target(z_t, z_end, a_t, s_t, a_end, s_end)
    student = ddim_step(z_t, x_tilde, a_t, s_t, a_end, s_end)

    torch.testing.assert_close(student, z_end, rtol=1e-10, atol=1e-10)
    # the test is not vacuous: one step with the teacher's own prediction lands elsewhere
    naive = ddim_step(z_t, teacher(z_t, t), a_t, s_t, a_end, s_end)
    assert (naive - z_end).abs().amax() > 1e-3
    # where t'' = 0 the target is the teacher's final sample itself, bit for bit
    clean = (s_end == 0).nonzero().squeeze(-1)
    assert clean.numel() >= 1
    assert torch.equal(x_tilde[clean], z_end[clean])


def test_the_target_on_a_discrete_ddpm_schedule_with_a_final_step_to_clean_data():
    T, B, C = 1000, 4, 2
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    teacher = FixedTeacher(C, seed=3)
    t, t_mid = torch.tensor([999, 500, 20, 10]), torch.tensor([749, 250, 10, 5])
    a_t, s_t = alpha_sigma(abar, t)
    a_mid, s_mid = alpha_sigma(abar, t_mid)
    a_end, s_end = alpha_sigma(abar, torch.tensor([499, 0, 0, 0]))
    a_end[1:], s_end[1:] = 1.0, 0.0  # "set_alpha_to_one": the last steps go to clean data
    z_t = randn((B, C, 3, 3), 9)
    z_mid = ddim_step(z_t, teacher(z_t, t / T), a_t, s_t, a_mid, s_mid)
    z_end = ddim_step(z_mid, teacher(z_mid, t_mid / T), a_mid, s_mid, a_end, s_end)
    x_tilde = progressive_distillation_target(z_t, z_end, a_t, s_t, a_end, s_end)
    torch.testing.assert_close(ddim_step(z_t, x_tilde, a_t, s_t, a_end, s_end), z_end, rtol=1e-10, atol=1e-10)
    assert torch.equal(x_tilde[1:], z_end[1:])


# ---------------------------------------------------------------- truncated SNR weight and PD loss


def test_snr_truncated_weight_by_hand():
    alpha = torch.tensor([0.96, 0.6, math.sqrt(0.5), 1.0, 0.0], dtype=torch.float64)
    sigma = torch.tensor([0.28, 0.8, math.sqrt(0.5), 0.0, 1.0], dtype=torch.float64)
    w = snr_truncated_weight(alpha, sigma)
    assert w.dtype == torch.float64
    # 0.9216 / 0.0784; SNR 0.5625 truncated to 1; SNR 1; sigma = 0 floored at 1e-8; SNR 0 truncated to 1
    assert w.tolist() == pytest.approx([0.9216 / 0.0784, 1.0, 1.0, 1e8, 1.0], rel=1e-12)
    assert bool(torch.isfinite(w).all())
    assert snr_truncated_weight(1.0, 0.0, sigma2_floor=1e-4).item() == pytest.approx(1e4)
    assert snr_truncated_weight(0.96, 0.28).item() == pytest.approx(11.755102040816, rel=1e-6)
    assert (
        snr_truncated_weight(torch.tensor([0.96]).half(), torch.tensor([0.28]).half()).dtype == torch.float32
    )
    with pytest.raises(ValueError, match="sigma2_floor"):
        snr_truncated_weight(1.0, 0.0, sigma2_floor=0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_progressive_distillation_loss_matches_a_loop(shape, reduction):
    seed = 5 + sum(shape)
    pred, target = randn(shape, seed), randn(shape, seed + 1)
    alpha, sigma = angles(shape[0], seed + 2)
    got = progressive_distillation_loss(pred, target, alpha, sigma, reduction=reduction)
    rows_p, rows_t = per_sample(pred), per_sample(target)
    values = [
        ref_weight(float(alpha[b]), float(sigma[b])) * ref_mse(rows_p[b], rows_t[b]) for b in range(shape[0])
    ]
    want = reduce(values, reduction)
    if reduction == "none":
        assert got.shape == (shape[0],)
        assert got.tolist() == pytest.approx(want, rel=1e-12)
    else:
        assert got.shape == () and got.item() == pytest.approx(want, rel=1e-12)


def test_progressive_distillation_loss_dtypes_and_errors():
    pred, target = randn((2, 3, 2, 2), 0), randn((2, 3, 2, 2), 1)
    alpha, sigma = angles(2, 2)
    assert progressive_distillation_loss(pred, target, alpha, sigma).dtype == torch.float64
    half = progressive_distillation_loss(pred.half(), target.half(), alpha.half(), sigma.half())
    f32 = progressive_distillation_loss(pred.float(), target.float(), alpha.float(), sigma.float())
    assert half.dtype == f32.dtype == torch.float32
    assert f32.item() == pytest.approx(
        progressive_distillation_loss(pred, target, alpha, sigma).item(), rel=1e-5
    )
    assert progressive_distillation_loss(pred, pred, alpha, sigma).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        progressive_distillation_loss(pred, target[:, :2], alpha, sigma)
    with pytest.raises(ValueError, match="reduction"):
        progressive_distillation_loss(pred, target, alpha, sigma, reduction="max")
    with pytest.raises(ValueError, match=r"\[B\]"):
        progressive_distillation_loss(pred, target, torch.ones(3), torch.zeros(3))


def test_progressive_distillation_loss_gradcheck():
    pred = randn((3, 2, 2, 2), 0).requires_grad_()
    target = randn((3, 2, 2, 2), 1).requires_grad_()
    alpha, sigma = angles(3, 2)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda p, t, r=reduction: progressive_distillation_loss(p, t, alpha, sigma, reduction=r),
            (pred, target),
        )


# ---------------------------------------------------------------- consistency models


def test_consistency_skip_out_boundary_and_hand_values():
    c_skip, c_out = consistency_skip_out(torch.tensor([0.002], dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out = consistency_skip_out(0.1, sigma_data=1.0, sigma_min=0.1)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    # sigma = 0.502, sigma_data = 0.5: c_skip = 0.25 / (0.25 + 0.25), c_out = 0.25 / sqrt(0.25 + 0.502^2)
    c_skip, c_out = consistency_skip_out(torch.tensor([0.502], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.5, rel=1e-12)
    assert c_out.item() == pytest.approx(0.25 / math.sqrt(0.502004), rel=1e-12)
    assert c_out.item() == pytest.approx(0.3528470, abs=1e-7)
    # far from the data: the output is all network, scaled to the data's standard deviation
    c_skip, c_out = consistency_skip_out(torch.tensor([1e6], dtype=torch.float64))
    assert c_skip.item() < 1e-12 and c_out.item() == pytest.approx(0.5, rel=1e-5)


def test_consistency_skip_out_matches_a_loop():
    sigma = karras_sigmas(17, dtype=torch.float64)
    c_skip, c_out = consistency_skip_out(sigma, sigma_data=0.7, sigma_min=0.002)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(0.49 / ((s - 0.002) ** 2 + 0.49), rel=1e-12)
        assert c_out[i].item() == pytest.approx(0.7 * (s - 0.002) / math.sqrt(0.49 + s * s), rel=1e-12, abs=0)


@pytest.mark.parametrize("n", [2, 3, 18, 40])
def test_karras_sigmas_endpoints_monotonic_and_formula(n):
    s = karras_sigmas(n, dtype=torch.float64)
    assert s.shape == (n,)
    assert s[0].item() == 0.002 and s[-1].item() == 80.0
    assert bool((s[1:] > s[:-1]).all())
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    for i in range(n):
        assert s[i].item() == pytest.approx((lo + i / (n - 1) * (hi - lo)) ** 7, rel=1e-12)
    other = karras_sigmas(n, sigma_min=0.01, sigma_max=5.0, rho=3.0)
    assert other.dtype == torch.get_default_dtype()
    assert other[0].item() == pytest.approx(0.01) and other[-1].item() == pytest.approx(5.0)


def test_karras_sigmas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n >= 2"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="rho"):
        karras_sigmas(5, rho=0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_pseudo_huber_matches_a_loop(shape):
    seed = 13 + sum(shape)
    x, y = randn(shape, seed), randn(shape, seed + 1)
    rx, ry = per_sample(x), per_sample(y)
    for c in (0.03, 1.0):
        got = pseudo_huber(x, y, c)
        assert got.shape == (shape[0],)
        assert got.tolist() == pytest.approx([ref_pseudo_huber(rx[b], ry[b], c) for b in range(shape[0])])
    c = torch.linspace(0.1, 2.0, shape[0], dtype=torch.float64)
    want = [ref_pseudo_huber(rx[b], ry[b], float(c[b])) for b in range(shape[0])]
    assert pseudo_huber(x, y, c).tolist() == pytest.approx(want, rel=1e-12)


def test_pseudo_huber_limits():
    x = randn((3, 2, 4, 4), 1)
    assert pseudo_huber(x, x, 0.01).tolist() == [0.0, 0.0, 0.0]
    # equal inputs: a zero, finite gradient (a plain norm would give NaN)
    xg = x.clone().requires_grad_()
    pseudo_huber(xg, x, 0.01).sum().backward()
    assert torch.equal(xg.grad, torch.zeros_like(x))
    # small differences: ||d||^2 / (2c), with relative error about ||d||^2 / (4 c^2)
    d = 1e-4 * randn((3, 2, 4, 4), 2)
    sq = [math.fsum(v * v for v in row) for row in per_sample(d)]
    got = pseudo_huber(x + d, x, 1.0).tolist()
    assert got == pytest.approx([s / 2.0 for s in sq], rel=1e-6)
    assert min(got) > 0.0  # no cancellation to 0: the stable form keeps tiny distances
    # large differences: ||d|| - c
    big = 1e4 * randn((3, 2, 4, 4), 3)
    norms = [math.sqrt(math.fsum(v * v for v in row)) for row in per_sample(big)]
    assert pseudo_huber(big, torch.zeros_like(big), 0.5).tolist() == pytest.approx(
        [n - 0.5 for n in norms], rel=1e-9
    )
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(x, x, 0.0)
    assert pseudo_huber(x.half(), x.half(), 0.1).dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_consistency_distillation_loss_matches_a_loop(shape, reduction):
    seed = 17 + sum(shape)
    s_out, t_out = randn(shape, seed), 0.01 * randn(shape, seed + 1)
    weight = 0.5 + torch.rand(shape[0], dtype=torch.float64, generator=gen(seed + 2))
    rs, rt = per_sample(s_out), per_sample(t_out)
    d = len(rs[0])
    c_default = 0.00054 * math.sqrt(d)
    cases = {
        ("l2", None, None): [ref_mse(rs[b], rt[b]) for b in range(shape[0])],
        ("l2", None, True): [float(weight[b]) * ref_mse(rs[b], rt[b]) for b in range(shape[0])],
        ("pseudo_huber", None, None): [ref_pseudo_huber(rs[b], rt[b], c_default) for b in range(shape[0])],
        ("pseudo_huber", 0.2, True): [
            float(weight[b]) * ref_pseudo_huber(rs[b], rt[b], 0.2) for b in range(shape[0])
        ],
    }
    for (distance, c, weighted), values in cases.items():
        got = consistency_distillation_loss(
            s_out, t_out, distance=distance, c=c, weight=weight if weighted else None, reduction=reduction
        )
        want = reduce(values, reduction)
        if reduction == "none":
            assert got.shape == (shape[0],) and got.tolist() == pytest.approx(want, rel=1e-12)
        else:
            assert got.shape == () and got.item() == pytest.approx(want, rel=1e-12)


def test_consistency_distillation_loss_default_c_and_errors():
    s_out, t_out = randn((2, 3, 8, 8), 0), randn((2, 3, 8, 8), 1)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    torch.testing.assert_close(
        consistency_distillation_loss(s_out, t_out, distance="pseudo_huber", reduction="none"),
        pseudo_huber(s_out, t_out, c),
    )
    assert consistency_distillation_loss(s_out, s_out, distance="pseudo_huber").item() == 0.0
    half = consistency_distillation_loss(s_out.half(), t_out.half())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="distance"):
        consistency_distillation_loss(s_out, t_out, distance="lpips")
    with pytest.raises(ValueError, match="weight"):
        consistency_distillation_loss(s_out, t_out, weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one shape"):
        consistency_distillation_loss(s_out, t_out[:1])


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_consistency_distillation_loss_gradcheck(distance):
    s_out = randn((3, 2, 3, 3), 0).requires_grad_()
    t_out = randn((3, 2, 3, 3), 1).requires_grad_()
    weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    for c in (None, 0.3):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda s, t, c=c, r=reduction: consistency_distillation_loss(
                    s, t, distance=distance, c=c, weight=weight, reduction=r
                ),
                (s_out, t_out),
            )
