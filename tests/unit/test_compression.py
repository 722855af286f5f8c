"""Compression-aware distillation: the pruning schedule and masks against naive references, pruned and
fake-quantized students that survive checkpoint and resume bit-identically, the exported float
students, and the int8 conversion."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from distillery.data import ArrayDataset
from distillery.functional import magnitude_mask, sparsity_at
from distillery.losses import CrossEntropyLoss, KDLoss, Objective
from distillery.models.cnn import SmallCNN
from distillery.models.compression import (
    PruneConfig,
    PruningSchedule,
    QATConfig,
    convert_int8,
    float_weights,
    observers_frozen,
    prepare_pruning,
    prepare_qat,
    sparse_bytes,
    sparsity,
)
from distillery.teachers import FrozenTeacher
from distillery.train import TrainConfig, fit


def naive_sparsity(t: int, total: int, final: float, start: float, end: float) -> float:
    t0, t1 = start * total, end * total
    if t <= t0:
        return 0.0
    if t >= t1:
        return final
    x = (float(t) - t0) / (t1 - t0)
    return final * (1.0 - (1.0 - x) * (1.0 - x) * (1.0 - x))


@pytest.mark.parametrize(
    "total,final,start,end", [(100, 0.8, 0.1, 0.7), (37, 0.5, 0.0, 1.0), (1000, 0.95, 0.2, 0.5)]
)
def test_sparsity_schedule_matches_the_cubic_formula(total, final, start, end):
    values = [sparsity_at(t, total, final, start, end) for t in range(total + 1)]
    for t, v in enumerate(values):
        assert v == pytest.approx(naive_sparsity(t, total, final, start, end), abs=1e-12)
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))  # never falls
    assert values[0] == 0.0 and values[-1] == final
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsity_at(0, 10, 1.0)
    with pytest.raises(ValueError, match="start < end"):
        sparsity_at(0, 10, 0.5, start=0.6, end=0.6)


def naive_mask(weight: torch.Tensor, s: float) -> torch.Tensor:
    flat = [abs(float(v)) for v in weight.double().reshape(-1)]
    k = math.floor(s * len(flat))
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))  # smallest first, earlier index first
    mask = [1.0] * len(flat)
    for i in order[:k]:
        mask[i] = 0.0
    return torch.tensor(mask, dtype=weight.dtype).reshape(weight.shape)


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 2, 3, 3)])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_matches_a_sorted_loop(shape, s):
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(shape, generator=g)
    w.reshape(-1)[::3] = 0.25  # ties: the earlier entry goes first
    mask = magnitude_mask(w, s)
    assert torch.equal(mask, naive_mask(w, s))
    assert int((mask == 0).sum()) == math.floor(s * w.numel())
    kept, pruned = w.abs()[mask == 1], w.abs()[mask == 0]
    if len(pruned) and len(kept):
        assert pruned.max() <= kept.min()


def test_a_rising_schedule_never_revives_a_pruned_weight():
    w = torch.randn(50, generator=torch.Generator().manual_seed(0))
    first = magnitude_mask(w, 0.4)
    second = magnitude_mask(w * first + 10.0 * (1 - first) * 0, 0.6)  # pruned entries are zero now
    assert torch.all(second <= first)


def tiny_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    torch.manual_seed(1)
    teacher = FrozenTeacher(SmallCNN(1, 4, (8,), 1, 0.0))
    return ArrayDataset(x, y, torch.arange(96)), teacher


def student() -> nn.Module:
    torch.manual_seed(2)
    return SmallCNN(1, 4, (6, 8), 1, 0.0)


def objective() -> Objective:
    return Objective({"ce": CrossEntropyLoss(), "kd": KDLoss(2.0, 0.5)})


CONFIG = TrainConfig(steps=24, batch_size=16, checkpoint_every=5, keep_checkpoints=2, eval_every=0,
                     optimizer={"name": "adamw", "lr": 0.01})  # fmt: skip


class Stop(Exception):
    pass


def _train(make, before, tmp_path, stop_at=None, resume=False):
    data, teacher = tiny_problem()
    model = make()

    def on_step(step):
        if step == stop_at:
            raise Stop

    try:
        result = fit(model, data, objective(), CONFIG, teacher=teacher, seed=3, progress=False, run_dir=tmp_path,
                     resume=resume, on_step=on_step, before_step=before)  # fmt: skip
    except Stop:
        return None
    return result.model


def pruned():
    return prepare_pruning(student())


def test_pruning_follows_its_schedule_and_masks_survive_resume_bit_identically(tmp_path):
    cfg = PruneConfig(sparsity=0.75, start=0.1, end=0.6, every=4)
    schedule = PruningSchedule(cfg, CONFIG.steps)
    seen = []

    def before(model, step):
        schedule(model, step)
        seen.append((step, sparsity(model)))

    ref = _train(pruned, before, tmp_path / "ref")
    for step, measured in seen:  # the masks reach each target (per layer floor: at most 1/numel below)
        last_update = step - step % cfg.every
        assert measured == pytest.approx(schedule.target(last_update), abs=0.02), step
    assert sparsity(ref) == pytest.approx(0.75, abs=0.01)
    for _, module in [(n, m) for n, m in ref.named_modules() if hasattr(m, "weight_mask")]:
        assert torch.all((module.weight_orig * module.weight_mask)[module.weight_mask == 0] == 0)

    # stopped after step 13 (checkpoints 5 and 10, taken between mask updates), then resumed
    assert _train(pruned, schedule, tmp_path / "run", stop_at=13) is None
    resumed = _train(pruned, schedule, tmp_path / "run", resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    plain = float_weights(resumed, student())
    assert isinstance(plain.body[0], nn.Conv2d) and "weight_mask" not in dict(plain.named_buffers())
    assert sparsity(plain) == pytest.approx(sparsity(resumed))
    assert sparse_bytes(plain) < 0.75 * sum(p.numel() * 4 for p in plain.parameters()) + 4096


def qat(backend="x86"):
    x = torch.randn(2, 1, 8, 8)
    return prepare_qat(student(), QATConfig(backend=backend), x)


def test_fake_quantization_observers_survive_resume_and_the_int8_model_follows(tmp_path):
    ref = _train(qat, None, tmp_path / "ref")
    observers = [k for k in ref.state_dict() if k.endswith(("scale", "zero_point", "min_val", "max_val"))]
    assert len(observers) >= 8  # weights (per channel) and activations
    assert _train(qat, None, tmp_path / "run", stop_at=12) is None
    resumed = _train(qat, None, tmp_path / "run", resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    scale = resumed.state_dict()["body.0.weight_fake_quant.scale"]
    assert scale.shape == (6,)  # one scale per output channel
    int8 = convert_int8(resumed, "x86")
    assert isinstance(int8.head, torch.ao.nn.quantized.Linear)
    assert (
        int8.head.weight().dtype == torch.qint8 and int8.head.weight().qscheme() == torch.per_channel_affine
    )
    plain = float_weights(resumed, student())  # the float weights trained under fake quantization
    assert torch.equal(plain.body[0].weight, resumed.state_dict()["body.0.weight"])


def test_the_int8_model_computes_what_fake_quantization_simulated(tmp_path):
    """qnnpack: 8-bit activations in both (on x86, fake quantization simulates 7-bit activations,
    reduce_range, while the int8 kernels keep the 8th bit as headroom, so the two differ wherever the
    short training's ranges are exceeded). Inputs inside the observed input range."""
    model = _train(lambda: qat("qnnpack"), None, tmp_path)
    int8 = convert_int8(model, "qnnpack")
    assert isinstance(int8.head, torch.ao.nn.quantized.Linear)
    state = model.state_dict()
    lo, hi = (
        float(state[f"activation_post_process_0.activation_post_process.{k}"]) for k in ("min_val", "max_val")
    )
    x = tiny_problem()[0].x[:32].clamp(lo, hi)
    with torch.no_grad(), observers_frozen(model):
        fake, real = model.eval()(x), int8(x)
    step = float(state["activation_post_process_7.scale"])  # one quantization step of the logits
    assert (fake - real).abs().max() <= 3 * step
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.9


def test_frozen_observers_keep_the_ranges_and_come_back():
    model = qat()
    model(torch.randn(4, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with observers_frozen(model):
        model(10 * torch.randn(4, 1, 8, 8))  # far outside the ranges seen
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(10 * torch.randn(4, 1, 8, 8))
    assert not torch.equal(
        before["activation_post_process_0.scale"], model.state_dict()["activation_post_process_0.scale"]
    )


def test_per_tensor_weights_when_asked():
    model = prepare_qat(student(), QATConfig(per_channel=False), torch.randn(2, 1, 8, 8))
    model(torch.randn(4, 1, 8, 8))
    assert model.state_dict()["body.0.weight_fake_quant.scale"].numel() == 1
