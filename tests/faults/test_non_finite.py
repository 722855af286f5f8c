"""Non-finite training: the guard fires before the optimizer step, a checkpoint never holds NaN or
infinite weights, and the message names the step, the part, and the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distillery.data import ArrayDataset
from distillery.errors import NonFiniteLossError
from distillery.losses import CrossEntropyLoss, LossTerm, Objective
from distillery.train import TrainConfig, fit
from distillery.train.checkpoint import checkpoint_dirs
from tests.faults.conftest import TALLY


def _data():
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g), torch.arange(32)
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


class _NaNGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class _Trap(LossTerm):
    """A finite loss from call ``at`` on: with NaN gradients (``kind="grad"``), or so steep that one
    SGD step overflows the weights to infinity (``kind="overflow"``)."""

    needs_teacher = False

    def __init__(self, at: int, kind: str) -> None:
        super().__init__()
        self.calls, self.at, self.kind = 0, at, kind

    def forward(self, inputs, num_valid=None):
        self.calls += 1
        logits = inputs.student_logits
        if self.calls < self.at:
            return logits.sum() * 0.0
        if self.kind == "grad":
            return _NaNGradient.apply(logits).mean() * 1e-3
        return logits.mean() * 1e30  # finite in float32; times lr 1e15 the update overflows


def _assert_finite_checkpoints(run_dir):
    for ckpt in checkpoint_dirs(run_dir):
        for name, value in load_file(str(ckpt / "model.safetensors")).items():
            assert torch.isfinite(value).all(), (ckpt, name)


def test_nan_gradients_with_a_finite_loss_stop_before_the_weights_change(tmp_path):
    model = _model()
    obj = Objective({"ce": CrossEntropyLoss(), "trap": _Trap(at=5, kind="grad")})
    cfg = TrainConfig(steps=10, batch_size=8, optimizer={"name": "adamw", "lr": 0.01}, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, _data(), obj, cfg, run_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "non-finite gradients at step 5" in msg and "this step changed no weight" in msg
    assert "step-00000004" in msg and "last good checkpoint" in msg
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the weights in memory too
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]  # keep_checkpoints=1
    _assert_finite_checkpoints(tmp_path)
    TALLY["non-finite steps stopped with good weights kept"] += 1


def test_weights_that_overflow_are_never_checkpointed(tmp_path):
    obj = Objective({"trap": _Trap(at=3, kind="overflow")})  # zero gradients until step 3
    cfg = TrainConfig(
        steps=10, batch_size=8, optimizer={"name": "sgd", "lr": 1e15, "momentum": 0.0}, checkpoint_every=1
    )
    with pytest.raises(NonFiniteLossError) as info:
        fit(_model(), _data(), obj, cfg, run_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "step 3 made the model's weights non-finite" in msg and "not checkpointed" in msg
    assert "step-00000002" in msg
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002"]  # keep_checkpoints=1
    _assert_finite_checkpoints(tmp_path)
    TALLY["non-finite steps stopped with good weights kept"] += 1
