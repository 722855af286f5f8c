import math

import numpy as np
import pytest
import torch

from distillery.eval import agreement, classification_metrics, expected_calibration_error
from distillery.train.config import ScheduleConfig
from distillery.train.schedules import cosine_schedule, lr_multipliers, warmup_then_constant


def test_warmup_then_cosine_to_min():
    m = lr_multipliers(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), 20)
    assert np.allclose(m[:4], [0.25, 0.5, 0.75, 1.0])
    assert m[4] == pytest.approx(1.0) and m[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))
    )
    assert np.all(np.diff(m[4:]) <= 0)


def test_step_linear_constant():
    assert np.allclose(lr_multipliers(ScheduleConfig(name="constant"), 5), 1.0)
    lin = lr_multipliers(ScheduleConfig(name="linear"), 5)
    assert np.allclose(
        lin, [1.0, 0.8, 0.6, 0.4, 0.2]
    )  # the multiplier of each update; 0 would be a wasted step
    step = lr_multipliers(ScheduleConfig(name="step", milestones=[0.5], gamma=0.1), 4)
    assert np.allclose(step, [1.0, 1.0, 0.1, 0.1])


def _naive_ece(logits, labels, bins):
    probs = torch.softmax(logits.double(), -1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels)) if lo < probs[i].max().item() <= hi]
        if not members:
            continue
        acc = sum(int(probs[i].argmax() == labels[i]) for i in members) / len(members)
        conf = sum(probs[i].max().item() for i in members) / len(members)
        total += len(members) / len(labels) * abs(acc - conf)
    return 100 * total


@pytest.mark.parametrize("bins", [1, 5, 15])
def test_ece_matches_naive_loop(bins):
    g = torch.Generator().manual_seed(bins)
    logits = torch.randn(200, 5, generator=g) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    assert expected_calibration_error(logits, labels, bins) == pytest.approx(
        _naive_ece(logits, labels, bins), abs=1e-4
    )


def test_metrics_bundle_and_agreement():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    m = classification_metrics(logits, labels, teacher)
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["agreement"] == pytest.approx(200 / 3) and agreement(logits, logits) == 100.0
    assert m["nll"] > 0 and 0 <= m["ece"] <= 100


def test_paired_wins_follow_the_metric_direction_and_ties_are_not_wins():
    from types import SimpleNamespace

    from distillery.experiment.summary import summarize
    from distillery.tasks import Metric

    def record(value):
        return {"metrics": {"ppl": value}, "params": 1, "seconds": 0.0}

    task = SimpleNamespace(
        metrics=(Metric("ppl", "perplexity", higher_is_better=False),),
        arms=lambda: ["baseline", "distilled"],
        label=lambda arm: arm,
    )
    result = SimpleNamespace(
        config=SimpleNamespace(name="t", task="toy", seeds=[0, 1, 2]),
        task=task,
        teachers={},
        arms={"baseline": {0: record(10.0), 1: record(10.0), 2: record(10.0)},
              "distilled": {0: record(9.0), 1: record(10.0), 2: record(11.0)}},  # better, tie, worse
        seconds=0.0,
    )  # fmt: skip
    paired = summarize(result)["paired_distilled_minus_baseline"]["ppl"]
    assert paired["better"] == 1 and paired["wins"] == 1 and paired["mean"] == 0.0  # wins: raw a > b count


@pytest.mark.parametrize("total,warm", [(1, 0), (5, 0), (10, 3), (7, 7)])
def test_cosine_schedule_is_dinos_per_iteration_schedule(total, warm):

    base, final, start = 0.5, 0.01, 0.1
    got = cosine_schedule(base, final, total, warmup_steps=warm, warmup_start=start)
    want = []
    for i in range(warm):  # np.linspace(start, base, warm)
        want.append(start + (base - start) * (i / (warm - 1) if warm > 1 else 0.0))
    n = total - warm
    for i in range(n):
        want.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert len(got) == total


def test_momentum_and_weight_decay_schedules_move_the_right_way():

    m = cosine_schedule(0.996, 1.0, 100)
    assert m[0] == 0.996 and np.all(np.diff(m) > 0) and m[-1] < 1.0
    wd = cosine_schedule(0.04, 0.4, 50)
    assert wd[0] == pytest.approx(0.04) and np.all(np.diff(wd) > 0)
    temp = warmup_then_constant(0.04, 0.07, 30, 100)
    assert temp[0] == 0.04 and temp[29] == pytest.approx(0.07) and np.all(temp[29:] == 0.07)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_then_constant(0.04, 0.07, 30, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)
