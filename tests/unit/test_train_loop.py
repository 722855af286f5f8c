import json
import os
import signal

import pytest
import torch
from torch import nn

from distillery.data import ArrayDataset
from distillery.errors import ConfigError, NonFiniteLossError, RunInterrupted
from distillery.losses import CrossEntropyLoss, ForwardKLLoss, KDLoss, LossTerm, Objective
from distillery.teachers import CachedTeacher, FrozenTeacher
from distillery.train import TrainConfig, fit
from distillery.train.batches import BatchPlan
from distillery.train.checkpoint import checkpoint_dirs
from distillery.train.logging import read_metrics


def _data(n=48, d=6, classes=4, seed=0, unlabelled_every=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    y[::unlabelled_every] = -100  # an uneven mix of labelled and transfer rows
    return ArrayDataset(x, y, torch.arange(n))


def _model(seed=0, dropout=0.0, d=6, classes=4):
    torch.manual_seed(seed)
    layers = (
        [nn.Linear(d, 16), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, classes)]
    )
    return nn.Sequential(*layers)


def _teacher(seed=1):
    torch.manual_seed(seed)
    return FrozenTeacher(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)))


def _objective():
    return Objective({"ce": CrossEntropyLoss(), "kd": ForwardKLLoss(2.0)}, weights={"ce": 0.3, "kd": 0.7})


def _cfg(**kw):
    base = {"steps": 12, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}, "log_every": 1}
    base.update(kw)
    return TrainConfig(**base)


def _same(a: nn.Module, b: nn.Module, exact=True, atol=1e-6):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb) if exact else torch.allclose(va, vb, atol=atol), ka


def test_fit_is_deterministic_and_learns():
    data = _data()
    runs = [
        fit(_model(), data, _objective(), _cfg(), teacher=_teacher(), seed=3, progress=False)
        for _ in range(2)
    ]
    _same(runs[0].model, runs[1].model)
    other = fit(_model(), data, _objective(), _cfg(), teacher=_teacher(), seed=4, progress=False)
    assert not torch.equal(other.model[0].weight, runs[0].model[0].weight)
    assert set(runs[0].last_losses) == {"loss", "ce", "kd"}


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_gradient_accumulation_equals_one_big_batch(accum):
    """grad_accum x (8/accum) micro-batches give the same updates as one batch of 8 (uneven label counts)."""
    data = _data(n=40, unlabelled_every=3)
    obj = Objective({"ce": CrossEntropyLoss(), "kd": KDLoss(2.0, 0.6)}, weights={"ce": 0.5, "kd": 1.0})
    sgd = {"name": "sgd", "lr": 0.5, "momentum": 0.0}
    one = fit(_model(), data, obj, _cfg(steps=6, optimizer=sgd), teacher=_teacher(), progress=False)
    many = fit(
        _model(),
        data,
        obj,
        _cfg(steps=6, optimizer=sgd, grad_accum=accum),
        teacher=_teacher(),
        progress=False,
    )
    _same(one.model, many.model, exact=False, atol=2e-6)
    assert one.last_losses == pytest.approx(many.last_losses, rel=1e-6)


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_gradient_accumulation_equals_one_big_batch_for_kd_with_sparse_labels(accum):
    """kd alone, one labelled row in five: micro-batches hold 0, 1 or more labelled rows, yet the CE
    part is divided by the step's labelled rows and the KL part by its valid rows, as in one batch."""
    base = _data(n=40)
    y = torch.full((40,), -100)
    y[2::5] = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(5))
    data = ArrayDataset(base.x, y, base.index)
    obj = Objective({"kd": KDLoss(2.0, 0.3)})
    sgd = {"name": "sgd", "lr": 0.5, "momentum": 0.0}
    one = fit(_model(), data, obj, _cfg(steps=6, optimizer=sgd), teacher=_teacher(), progress=False)
    many = fit(
        _model(),
        data,
        obj,
        _cfg(steps=6, optimizer=sgd, grad_accum=accum),
        teacher=_teacher(),
        progress=False,
    )
    _same(one.model, many.model, exact=False, atol=2e-6)
    assert one.last_losses == pytest.approx(many.last_losses, rel=1e-6)


def test_requires_a_teacher_for_distillation_terms():
    with pytest.raises(ConfigError, match="need a teacher"):
        fit(_model(), _data(), _objective(), _cfg(), progress=False)


def test_batch_size_must_split_over_accumulation():
    with pytest.raises(ConfigError, match="must be divisible"):
        fit(
            _model(),
            _data(),
            Objective({"ce": CrossEntropyLoss()}),
            _cfg(batch_size=9, grad_accum=1, steps=1).model_copy(update={"grad_accum": 2}),
            progress=False,
        )


def test_cached_teacher_gives_the_same_run_as_the_live_teacher():
    data = _data()
    live = fit(_model(), data, _objective(), _cfg(), teacher=_teacher(), progress=False)
    cached = fit(
        _model(),
        data,
        _objective(),
        _cfg(),
        teacher=CachedTeacher.precompute(_teacher(), data, 7),
        progress=False,
    )
    _same(live.model, cached.model, exact=False, atol=1e-6)


def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Ctrl-C at step 7 writes a checkpoint; --resume ends with exactly the weights of a run never stopped.

    Dropout (torch RNG), Adam moments and the LR schedule all have to be restored for this to hold.
    """
    data = _data()
    cfg = _cfg(steps=15, schedule={"name": "cosine", "warmup_steps": 3})
    full = fit(_model(dropout=0.3), data, _objective(), cfg, teacher=_teacher(), seed=5, progress=False)

    def press_ctrl_c(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="interrupted after step 7 of 15"):
        fit(
            _model(dropout=0.3),
            data,
            _objective(),
            cfg,
            teacher=_teacher(),
            seed=5,
            run_dir=run_dir,
            progress=False,
            on_step=press_ctrl_c,
        )
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-00000007"]
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary leftovers
    resumed = fit(
        _model(seed=99, dropout=0.3),
        data,
        _objective(),
        cfg,
        teacher=_teacher(),
        seed=5,
        run_dir=run_dir,
        resume=True,
        progress=False,
    )
    assert resumed.resumed_from == 7 and resumed.steps == 15
    _same(full.model, resumed.model)
    steps = [r["step"] for r in read_metrics(run_dir, "train")]
    assert steps == list(range(1, 16))  # no step logged twice after resuming
    assert {"ce", "kd", "loss", "lr"} <= set(read_metrics(run_dir, "train")[0])


def test_checkpoints_load_with_weights_only(tmp_path):
    from safetensors.torch import load_file

    fit(
        _model(),
        _data(),
        _objective(),
        _cfg(checkpoint_every=4, keep_checkpoints=2),
        teacher=_teacher(),
        run_dir=tmp_path,
        progress=False,
    )
    dirs = checkpoint_dirs(tmp_path)
    assert [p.name for p in dirs] == ["step-00000008", "step-00000012"]
    last = dirs[-1]
    assert set(load_file(str(last / "model.safetensors"))) == set(_model().state_dict())
    for name in ("optimizer.pt", "trainer.pt", "rng-rank0.pt"):
        torch.load(last / name, weights_only=True)  # raises if anything but plain data were pickled
    assert torch.load(last / "trainer.pt", weights_only=True)["step"] == 12


class _NaNAtStep(LossTerm):
    needs_teacher = False

    def __init__(self, bad_call):
        super().__init__()
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, inputs, num_valid=None):
        self.calls += 1
        value = inputs.student_logits.sum() * 0.0
        return value + float("nan") if self.calls == self.bad_call else value


def test_non_finite_loss_stops_naming_step_and_part_and_keeps_last_checkpoint(tmp_path):
    obj = Objective({"ce": CrossEntropyLoss(), "trap": _NaNAtStep(bad_call=6)})
    with pytest.raises(NonFiniteLossError) as info:
        fit(_model(), _data(), obj, _cfg(checkpoint_every=2), run_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "non-finite loss at step 6 in part(s) trap" in msg and "last good checkpoint" in msg
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]


def test_evaluation_history_and_metric_log(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"score": float(len(calls))}

    result = fit(
        _model(),
        _data(),
        _objective(),
        _cfg(eval_every=4),
        teacher=_teacher(),
        run_dir=tmp_path,
        evaluate=evaluate,
        progress=False,
    )
    assert [h["step"] for h in result.history] == [4, 8, 12]
    evals = read_metrics(tmp_path, "eval")
    assert [e["score"] for e in evals] == [1.0, 2.0, 3.0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["split"] in ("train", "eval") for line in lines)


def test_batch_plan_visits_every_example_once_per_epoch():
    plan = BatchPlan(10, 4, seed=0)
    stream = torch.cat([plan.indices(k) for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(BatchPlan(10, 4, seed=0).indices(3), plan.indices(3))
    assert not torch.equal(BatchPlan(10, 4, seed=1).indices(0), plan.indices(0))
    assert plan.epoch_of(5) == 2.0
    big = BatchPlan(3, 7, seed=0).indices(0)  # a batch larger than the data spans epochs
    assert len(big) == 7
