"""The dino loss term: the functional value, the centre buffer (updates, checkpoints), the teacher
temperature warm-up, row normalisation over micro-batches, and where the term may be used."""

import pytest
import torch

from distillery import functional as DF
from distillery.errors import ConfigError
from distillery.losses import DINOLoss, LossInputs, build_objective
from distillery.losses.self_supervised import DINOConfig
from distillery.models.ssl import SSL_OUT


def _inputs(student, teacher, epoch=0.0):
    b = student.shape[1]
    return LossInputs(
        student_logits=None,
        target=torch.full((b,), -100),
        mask=torch.ones(b, dtype=torch.bool),
        student_features={SSL_OUT: student},
        teacher_features={SSL_OUT: teacher},
        epoch=epoch,
    )


def _views(g, v_s=4, v_t=2, b=6, k=8):
    return torch.randn(v_s, b, k, generator=g), torch.randn(v_t, b, k, generator=g)


def test_the_term_is_the_functional_loss_and_updates_its_centre():
    g = torch.Generator().manual_seed(0)
    s, t = _views(g)
    term = DINOLoss(student_temperature=0.1, teacher_temperature=0.05, center_momentum=0.8)
    value = term(_inputs(s, t))
    torch.testing.assert_close(value, DF.dino_loss(s, t, torch.zeros(8), teacher_temperature=0.05))
    torch.testing.assert_close(term.center, 0.2 * t.reshape(-1, 8).mean(0))
    # the next batch is centred with the updated centre
    s2, t2 = _views(g)
    centre = term.center.clone()
    torch.testing.assert_close(term(_inputs(s2, t2)), DF.dino_loss(s2, t2, centre, teacher_temperature=0.05))
    torch.testing.assert_close(term.center, 0.8 * centre + 0.2 * t2.reshape(-1, 8).mean(0))


def test_the_centre_is_saved_and_restored_with_the_objective():
    g = torch.Generator().manual_seed(1)
    objective = build_objective({"dino": DINOConfig()})
    s, t = _views(g)
    objective(_inputs(s, t))
    state = objective.state_dict()
    assert state["terms.dino.center"].shape == (8,)
    fresh = build_objective({"dino": DINOConfig()})
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.terms["dino"].center, objective.terms["dino"].center)
    s2, t2 = _views(g)
    torch.testing.assert_close(fresh(_inputs(s2, t2))["dino"], objective(_inputs(s2, t2))["dino"])


def test_eval_mode_leaves_the_centre_alone():
    g = torch.Generator().manual_seed(2)
    term = DINOLoss().eval()
    s, t = _views(g)
    term(_inputs(s, t))
    assert torch.equal(term.center, torch.zeros(8))


def test_teacher_temperature_warm_up():
    term = DINOLoss(
        teacher_temperature=0.07, teacher_temperature_start=0.04, teacher_temperature_warmup_epochs=10
    )
    assert [round(term.teacher_temperature_at(e), 4) for e in (0, 5, 10, 20)] == [0.04, 0.055, 0.07, 0.07]
    assert DINOLoss(teacher_temperature=0.05).teacher_temperature_at(3.0) == 0.05
    with pytest.raises(ValueError, match="teacher_temperature_warmup_epochs"):
        DINOConfig(teacher_temperature_start=0.04)


def test_micro_batches_are_weighted_by_their_images():
    """Two micro-batches of 2 and 4 images with a frozen centre: the sum of their normalised values is
    the row-weighted mean of their DINO losses (what one batch of 6 would give per image)."""
    g = torch.Generator().manual_seed(3)
    s, t = _views(g, b=6)
    term = DINOLoss(center_momentum=1.0)  # the centre never moves
    a = term(_inputs(s[:, :2], t[:, :2]), num_valid=6.0)
    b = term(_inputs(s[:, 2:], t[:, 2:]), num_valid=6.0)
    whole = DF.dino_loss(s, t, torch.zeros(8))
    torch.testing.assert_close(a + b, whole)


def test_missing_outputs_and_other_tasks_are_errors():
    term = DINOLoss()
    bad = LossInputs(
        student_logits=torch.zeros(2, 3), target=torch.zeros(2), mask=torch.ones(2, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match="task: ssl"):
        term(bad)
    import distillery as ds

    with pytest.raises(ConfigError, match=r"loss.dino \(dino\) is a self-supervised term.*task: ssl"):
        ds.load_config("digits-kd", ['loss={"dino": {}}'])


def test_the_term_reports_the_entropy_of_its_targets():
    """Collapse signs: equal teacher outputs for every image are uniform targets once centred (per-image
    entropy 1, in units of log K); one prototype far ahead for every image, with the centre not yet
    caught up, gives one-hot targets (both entropies near 0)."""
    term = DINOLoss(center_momentum=0.9)
    same = torch.ones(2, 6, 8)
    term.center = torch.ones(8)
    term(_inputs(torch.randn(3, 6, 8), same))
    assert term.targets_entropy["teacher_entropy"] == pytest.approx(1.0)
    assert term.targets_entropy["teacher_mean_entropy"] == pytest.approx(1.0)
    term = DINOLoss(center_momentum=0.9)
    one = torch.zeros(2, 6, 8)
    one[..., 3] = 5.0
    term(_inputs(torch.randn(3, 6, 8), one))
    assert (
        term.targets_entropy["teacher_entropy"] < 0.01 and term.targets_entropy["teacher_mean_entropy"] < 0.01
    )
    # images that pick different prototypes: sharp per image, spread on average
    term = DINOLoss(center_momentum=0.9)
    spread = torch.zeros(2, 8, 8)
    spread[:, torch.arange(8), torch.arange(8)] = 5.0
    term(_inputs(torch.randn(3, 8, 8), spread))
    assert term.targets_entropy["teacher_entropy"] < 0.01
    assert term.targets_entropy["teacher_mean_entropy"] == pytest.approx(1.0, abs=1e-3)


def test_the_byol_term_averages_both_directions_of_every_pair_of_views():
    from distillery.losses import LOSSES
    from distillery.models.ssl import SSL_PRED

    _, cls = LOSSES["byol"]
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    inputs = LossInputs(
        student_logits=None,
        target=torch.full((6,), -100),
        mask=torch.ones(6, dtype=torch.bool),
        student_features={SSL_PRED: pred},
        teacher_features={SSL_OUT: target},
    )
    want = (DF.byol_loss(pred[1], target[0]) + DF.byol_loss(pred[0], target[1])) / 2
    torch.testing.assert_close(cls()(inputs), want)
    torch.testing.assert_close(cls()(inputs, num_valid=12.0), want / 2)  # this micro-batch is half the rows
    with pytest.raises(ValueError, match="model.predictor"):
        cls()(_inputs(pred, target))  # no predictions: a network without a predictor
