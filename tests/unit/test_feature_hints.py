"""Feature hints between exits (BYOT): projections, the deepest-exit teacher's targets, the `hint`
term, the configuration checks and a run through the runner."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from distillery import functional as DF
from distillery.config import load_config
from distillery.errors import ConfigError
from distillery.losses import LossInputs, build_objective
from distillery.models.cnn import SmallCNN
from distillery.models.exits import ExitConfig, MultiExit, MultiExitAdapter
from distillery.models.mlp import MLP
from distillery.teachers.stacked import DeepestExitTeacher


def _mlp_with_hints(**kw):
    torch.manual_seed(0)
    model = MLP(12, 4, hidden=[10, 6])  # body: Flatten, Linear, ReLU, Linear, ReLU -> head
    x = torch.randn(8, 12)
    return model, x, MultiExit(model, ExitConfig(at=["body.2"], hint_at="body.4", **kw), example_input=x[:2])


def test_hint_features_are_projected_exits_then_the_pooled_hint_module_output():
    model, x, multi = _mlp_with_hints()
    assert [tuple(p.weight.shape) for p in multi.hint_heads] == [(6, 10)]  # exit width 10 -> hint width 6
    logits, hints = multi(x, hints=True)
    assert torch.equal(logits, multi(x))  # asking for hints does not change the logits
    assert hints.shape == (2, 8, 6)
    h1 = model.body[:3](x)  # output of body.2, the exit
    h2 = model.body(x)  # output of body.4, the hint module
    assert torch.allclose(hints[0], multi.hint_heads[0](h1), atol=1e-6)
    assert torch.allclose(hints[1], h2, atol=1e-6)


def test_hint_projections_on_feature_maps_pool_first():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, channels=[8, 16, 16])  # body.1: [B, 8, 8, 8]; body.6: [B, 16, 2, 2]
    x = torch.randn(3, 1, 8, 8)
    multi = MultiExit(model, ExitConfig(at=["body.1"], hint_at="body.6"), example_input=x)
    _, hints = multi(x, hints=True)
    assert hints.shape == (2, 3, 16)
    assert torch.allclose(hints[-1], model.body[:7](x).mean((2, 3)), atol=1e-6)


def test_hint_heads_are_training_only_parts():
    model, x, multi = _mlp_with_hints()
    plain = MultiExit(model, ExitConfig(at=["body.2"]), example_input=x[:2])
    assert multi.parameter_counts() == plain.parameter_counts()  # predictions never use the projections
    assert any(k.startswith("hint_heads.") for k in multi.state_dict())
    assert multi.export() is model
    assert torch.equal(multi.predict_exit(x, 0), multi(x)[0])
    with pytest.raises(ValueError, match="hint_at"):
        plain(x, hints=True)


def test_hint_module_errors_name_the_module():
    model = MLP(12, 4, hidden=[10, 6])
    with pytest.raises(ValueError, match="body.9"):
        MultiExit(model, ExitConfig(at=["body.2"], hint_at="body.9"), example_input=torch.zeros(2, 12))
    shared = nn.Linear(5, 5)
    twice = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(5, 3))
    with pytest.raises(ValueError, match="runs 2 times"):
        MultiExit(twice, ExitConfig(at=["1"], hint_at="0"), example_input=torch.zeros(2, 5))


def test_teacher_targets_are_the_detached_deep_feature_and_the_loss_trains_only_below_the_exit():
    model, x, multi = _mlp_with_hints()
    adapter = MultiExitAdapter(multi.num_exits, hints=True)
    batch = {"x": x, "y": torch.zeros(8, dtype=torch.long)}
    student = adapter.forward(multi, batch)
    teacher = DeepestExitTeacher()(batch, student)
    s_hint, t_hint = student.features["hint"], teacher.features["hint"]
    assert not t_hint.requires_grad
    assert torch.equal(t_hint[0], s_hint[-1].detach()) and torch.equal(t_hint[1], s_hint[-1].detach())

    target, mask = adapter.rows(batch)
    objective = build_objective(
        load_config("digits-exits", ["loss={hint: {}}", "teacher.exits.hint_at=body.4"]).loss
    )
    inputs = LossInputs(student.logits, target, mask, teacher.logits, student.features, teacher.features)
    value = objective(inputs)["hint"]
    # rows: E x B, the deepest row is its own target (0); the mean runs over all 2 x 8 rows
    assert value.item() == pytest.approx(DF.hint_loss(s_hint[0], t_hint[0]).item() / 2, rel=1e-6)
    value.backward()
    assert model.body[1].weight.grad.abs().sum() > 0  # below the exit
    assert multi.hint_heads[0].weight.grad.abs().sum() > 0
    assert not model.body[3].weight.grad.any()  # the deep layers are the teacher: no gradient
    assert model.head.weight.grad is None or not model.head.weight.grad.any()


def test_hint_term_needs_the_feature_on_both_sides():
    objective = build_objective(
        load_config("digits-exits", ["loss={hint: {}}", "teacher.exits.hint_at=body.4"]).loss
    )
    inputs = LossInputs(
        torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match="student and the teacher.*hint_at"):
        objective(inputs)


def test_hint_loss_falls_when_trained():
    _model, x, multi = _mlp_with_hints()
    adapter = MultiExitAdapter(multi.num_exits, hints=True)
    batch = {"x": x, "y": torch.zeros(8, dtype=torch.long)}
    objective = build_objective(
        load_config("digits-exits", ["loss={hint: {}}", "teacher.exits.hint_at=body.4"]).loss
    )
    opt = torch.optim.SGD(multi.parameters(), lr=0.5)
    values = []
    for _ in range(40):
        student = adapter.forward(multi, batch)
        teacher = DeepestExitTeacher()(batch, student)
        target, mask = adapter.rows(batch)
        loss = objective(
            LossInputs(student.logits, target, mask, teacher.logits, student.features, teacher.features)
        )["hint"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < 0.2 * values[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss={ce: {}, hint: {}}"], "needs a multi-exit student with hints"),
        (["teacher.exits.hint_at=body.4"], "no loss term trains them"),
        (["teacher={source: ema}", "loss={ce: {}, forward_kl: {}, hint: {}}"], "teacher.source=exits"),
    ],
)
def test_config_refuses_hints_without_their_other_half(overrides, message):
    with pytest.raises((ConfigError, ValidationError), match=message):
        load_config("digits-exits", overrides)


def test_language_model_runs_refuse_hint_terms():
    with pytest.raises((ConfigError, ValidationError), match="feature hints are for multi-exit classifiers"):
        load_config("lm-kd", ["loss={ce: {}, forward_kl: {}, hint: {}}"])


def test_a_run_with_hints_end_to_end(tmp_path):
    from distillery.experiment import run

    cfg = load_config(
        "digits-exits",
        ["seeds=[0]", "train.steps=20", "baseline.train.steps=20", "student.hidden=[16,16]",
         "teacher.exits.hint_at=body.4", "loss={ce: {}, forward_kl: {}, hint: {weight: 0.5}}",
         f"output.dir={tmp_path}"],
    )  # fmt: skip
    result = run(cfg, progress=False)
    members = result.arms["distilled"][0]["members"]
    assert list(members) == ["body.2", "final"]
    stacked = load_file(str(tmp_path / "seed-0" / "distilled" / "stacked.safetensors"))
    assert {"hint_heads.0.weight", "hint_heads.0.bias"} <= set(stacked)
    multi = MultiExit(MLP(64, 10, hidden=[16, 16]), cfg.teacher.exits, example_input=torch.zeros(2, 1, 8, 8))
    multi.load_state_dict(stacked)  # the saved multi-exit model (with projections) loads back
