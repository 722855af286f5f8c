"""DeepInversion's synthesis: reproducible from the seed, the teacher left as it was, the batch-norm
statistics pulled towards the stored ones, and a teacher without batch norm refused with the fix."""

from __future__ import annotations

import pytest
import torch

from distillery.errors import ConfigError
from distillery.generation.inversion import DeepInversionConfig, synthesize
from distillery.models.cnn import SmallCNN


def teacher(batch_norm: bool = True) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(1, 4, (6, 8), 1, 0.0, batch_norm=batch_norm)
    model.train()
    with torch.no_grad():  # running statistics of a "data" distribution unlike Gaussian noise
        for _ in range(20):
            model(torch.rand(32, 1, 8, 8) * 2.0 + 1.0)
    return model.eval()


CFG = DeepInversionConfig(images=24, batch_size=12, steps=40, bn_weight=1.0, jitter=1)


def test_synthesis_is_reproducible_and_leaves_the_teacher_unchanged():
    t = teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    x1, y1, losses = synthesize(t, CFG, (1, 8, 8), 4, seed=3)
    x2, y2, _ = synthesize(t, CFG, (1, 8, 8), 4, seed=3)
    x3, _, _ = synthesize(t, CFG, (1, 8, 8), 4, seed=4)
    assert x1.shape == (24, 1, 8, 8) and torch.equal(y1, torch.arange(24) % 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())  # running stats too
    assert not t.training and all(p.requires_grad for p in t.parameters())
    assert len(losses) == 2 and all(set(b) >= {"ce", "bn", "tv", "l2", "teacher_accuracy"} for b in losses)


def test_the_statistics_move_towards_the_stored_ones():
    t = teacher()
    short = synthesize(t, CFG.model_copy(update={"steps": 1}), (1, 8, 8), 4, seed=0)[2]
    long = synthesize(t, CFG.model_copy(update={"steps": 150}), (1, 8, 8), 4, seed=0)[2]
    assert long[0]["bn"] < 0.5 * short[0]["bn"]
    assert long[0]["ce"] < short[0]["ce"]


def test_a_teacher_without_batch_norm_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="teacher.model.batch_norm: true"):
        synthesize(teacher(batch_norm=False), CFG, (1, 8, 8), 4, seed=0)
