"""Loss terms: every short name builds from YAML-like config, calls its function, and counts its rows."""

import pytest
import torch

from distillery import functional as DF
from distillery.config import ConfigError, validate_config
from distillery.losses import LOSSES, LossInputs, Objective, build_loss, build_objective
from tests.unit.functional import reference as ref

# short name -> (functional reference, hyperparameters to set, uses labels)
CASES = {
    "forward_kl": (DF.forward_kl, {"temperature": 2.0}, False),
    "reverse_kl": (DF.reverse_kl, {"temperature": 3.0}, False),
    "jsd": (DF.generalized_jsd, {"beta": 0.3, "temperature": 2.0}, False),
    "tvd": (DF.total_variation, {"temperature": 1.5}, False),
    "skew_kl": (DF.skew_kl, {"alpha": 0.2, "temperature": 2.0}, False),
    "skew_reverse_kl": (DF.skew_reverse_kl, {"alpha": 0.3}, False),
    "dkd": (DF.dkd_loss, {"alpha": 0.5, "beta": 4.0, "temperature": 3.0}, True),
    "nkd": (DF.nkd_loss, {"temperature": 2.0, "gamma": 1.0}, True),
}


def config(loss: dict):
    """A run config holding only ``loss`` (plus the required sections)."""
    teacher = {"model": {"name": "mlp"}, "checkpoint": "teacher.safetensors"}
    return validate_config(
        {"student": {"name": "mlp"}, "train": {"steps": 1}, "teacher": teacher, "loss": loss}
    )


def batch(seed=0, rows=12, classes=6):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, classes, generator=g)
    t = torch.randn(rows, classes, generator=g) * 2
    y = torch.randint(0, classes, (rows,), generator=g)
    y[::3] = -100  # unlabelled transfer rows
    mask = torch.ones(rows, dtype=torch.bool)
    mask[-2:] = False  # padding
    return LossInputs(student_logits=s, target=y, mask=mask, teacher_logits=t)


def test_every_logit_family_name_is_in_the_table():
    # ce, kd and uskd have their own tests here; hint (features) in test_feature_hints.py; the
    # representation terms in tests/integration/test_representation_terms.py; the self-supervised ones
    # in test_ssl_terms.py / test_ssl_token_terms.py; the semi-supervised ones and deit in
    # tests/unit/functional/test_semi_supervised_losses.py and tests/integration/test_deit.py;
    # importance_reverse_kl (sampled tokens) in test_importance_term.py; uld and span_likelihood (a teacher
    # with another tokenizer) in test_cross_tokenizer_teacher.py
    from distillery.losses.representation import REPRESENTATION_LOSSES
    from distillery.losses.self_supervised import SELF_SUPERVISED_LOSSES
    from distillery.losses.semi_supervised import SEMI_SUPERVISED_LOSSES

    assert set(CASES) | {"ce", "kd", "uskd", "hint", "importance_reverse_kl", "uld", "span_likelihood"} | set(
        REPRESENTATION_LOSSES
    ) | set(SELF_SUPERVISED_LOSSES) | set(SEMI_SUPERVISED_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_term_from_config_equals_its_function(name):
    fn, hyper, uses_target = CASES[name]
    cfg = config({name: {"weight": 0.7, **hyper}}).loss[name]
    assert cfg.weight == 0.7
    term = build_loss(cfg)
    inputs = batch()
    rows = term.rows(inputs.target, inputs.mask)
    expected_rows = inputs.mask & (inputs.target != -100) if uses_target else inputs.mask
    assert torch.equal(rows, expected_rows)
    got = term(inputs, num_valid=rows.sum())
    if uses_target:
        want = fn(inputs.student_logits, inputs.teacher_logits, inputs.target, mask=expected_rows, **hyper)
    else:
        want = fn(inputs.student_logits, inputs.teacher_logits, mask=inputs.mask, **hyper)
    assert torch.allclose(got, want, atol=1e-6)
    assert got > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_normalises_by_the_global_row_count(name):
    """Two halves with the global count sum to the loss of the whole batch (accumulation)."""
    objective = build_objective({name: config({name: CASES[name][1]}).loss[name]})
    whole = batch(seed=3, rows=16)
    total = objective.counts(whole.target, whole.mask)
    full = objective(whole, total)[name]
    halves = 0.0
    for part in (slice(0, 7), slice(7, 16)):
        sub = LossInputs(
            student_logits=whole.student_logits[part],
            target=whole.target[part],
            mask=whole.mask[part],
            teacher_logits=whole.teacher_logits[part],
        )
        halves = halves + objective(sub, total)[name]
    assert torch.allclose(halves, full, atol=1e-6)


# ---- kd: its KL part averages over the valid rows, its CE part over the labelled rows --------------


def _naive_kd(inputs, temperature, alpha, num_valid=None, num_labelled=None):
    rows = inputs.student_logits.double().tolist()
    return ref.kd_mean(
        rows,
        inputs.teacher_logits.double().tolist(),
        inputs.target.tolist(),
        inputs.mask.tolist(),
        temperature,
        alpha,
        num_valid=num_valid,
        num_labelled=num_labelled,
    )


def test_kd_term_counts_valid_and_labelled_rows_and_equals_the_naive_mean():
    term = build_loss(config({"kd": {"temperature": 2.0, "alpha": 0.6}}).loss["kd"])
    inputs = batch(seed=4)
    inputs.mask[1] = False  # a labelled row that is masked counts in neither part
    assert inputs.target[1] != -100
    counts = term.counts(inputs.target, inputs.mask)
    valid, labelled = int(inputs.mask.sum()), int((inputs.mask & (inputs.target != -100)).sum())
    assert counts.dtype == torch.float64 and counts.tolist() == [valid, labelled] and labelled < valid
    assert term(inputs).item() == pytest.approx(_naive_kd(inputs, 2.0, 0.6), rel=1e-5)
    assert term(inputs, counts).item() == pytest.approx(_naive_kd(inputs, 2.0, 0.6), rel=1e-5)
    larger = counts + torch.tensor([3.0, 5.0], dtype=torch.float64)  # a global step with more rows
    want = _naive_kd(inputs, 2.0, 0.6, num_valid=valid + 3, num_labelled=labelled + 5)
    assert term(inputs, larger).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"two counts, num_valid=\[valid rows, labelled rows\]"):
        term(inputs, counts[0])


def test_objective_gives_kd_its_two_global_counts_between_other_terms():
    """Halves with very different labelled shares, with the step's counts, sum to the whole batch."""
    cfg = config({"ce": {}, "kd": {"temperature": 3.0, "alpha": 0.3}, "forward_kl": {}}).loss
    objective = build_objective(cfg)
    whole = batch(seed=6, rows=16)
    whole.target[:6] = -100  # the first part is mostly unlabelled
    whole.student_logits.requires_grad_(True)
    total = objective.counts(whole.target, whole.mask)
    valid, labelled = float(whole.mask.sum()), float((whole.mask & (whole.target != -100)).sum())
    assert total.tolist() == [labelled, valid, labelled, valid]  # ce | kd (valid, labelled) | forward_kl
    full = objective(whole, total)
    assert full["kd"].item() == pytest.approx(_naive_kd(whole, 3.0, 0.3), rel=1e-5)
    (g_full,) = torch.autograd.grad(objective.total(full, 1.0), whole.student_logits)
    halves = {name: 0.0 for name in full}
    grads = []
    for part in (slice(0, 7), slice(7, 16)):
        sub = LossInputs(
            student_logits=whole.student_logits[part].detach().requires_grad_(),
            target=whole.target[part],
            mask=whole.mask[part],
            teacher_logits=whole.teacher_logits[part],
        )
        parts = objective(sub, total)
        grads.append(torch.autograd.grad(objective.total(parts, 1.0), sub.student_logits)[0])
        halves = {name: halves[name] + parts[name].detach() for name in parts}
    for name in full:
        assert torch.allclose(halves[name], full[name].detach(), atol=1e-6), name
    assert torch.allclose(torch.cat(grads), g_full, atol=1e-7)


def test_unknown_loss_name_lists_the_valid_ones_sorted():
    with pytest.raises(ConfigError) as info:
        config({"main": {"name": "dkdd"}})
    msg = str(info.value)
    assert "unknown loss 'dkdd'" in msg
    assert ", ".join(sorted(LOSSES)) in msg


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"jsd": {"beta": 1.5}}, "loss.jsd.beta"),
        ({"skew_kl": {"alpha": -0.1}}, "loss.skew_kl.alpha"),
        ({"dkd": {"temperature": 0}}, "loss.dkd.temperature"),
        ({"nkd": {"gammma": 1.0}}, "unknown key 'loss.nkd.gammma'"),
    ],
)
def test_bad_hyperparameters_name_the_field(term, message):
    with pytest.raises(ConfigError) as info:
        config(term)
    assert message in str(info.value)


def test_dkd_warmup_ramps_the_weight_linearly():
    cfg = config({"ce": {}, "dkd": {"weight": 2.0, "warmup_epochs": 4}}).loss
    objective = build_objective(cfg)
    assert [objective.weight_at("dkd", e) for e in (0.0, 1.0, 2.0, 4.0, 10.0)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert objective.weight_at("ce", 0.0) == 1.0


def test_all_unlabelled_batch_gives_zero_dkd_and_nkd_without_nan():
    inputs = batch()
    inputs.target = torch.full_like(inputs.target, -100)
    inputs.student_logits.requires_grad_(True)
    loss = config({"dkd": {}, "nkd": {}}).loss
    objective = Objective({"dkd": build_loss(loss["dkd"]), "nkd": build_loss(loss["nkd"])})
    counts = objective.counts(inputs.target, inputs.mask)
    assert counts.tolist() == [0.0, 0.0]
    parts = objective(inputs, counts)
    total = objective.total(parts, epoch=1.0)
    total.backward()
    assert total.item() == 0.0
    assert torch.equal(inputs.student_logits.grad, torch.zeros_like(inputs.student_logits))


@pytest.mark.parametrize("name", ["dkd", "nkd"])
def test_unlabelled_rows_can_take_the_teachers_top1_class(name):
    fn, hyper, _ = CASES[name]
    term = build_loss(config({name: {"unlabelled": "teacher", **hyper}}).loss[name])
    inputs = batch(seed=5)
    rows = term.rows(inputs.target, inputs.mask)
    assert torch.equal(rows, inputs.mask)  # every valid row counts, labelled or not
    pseudo = torch.where(inputs.target == -100, inputs.teacher_logits.argmax(-1), inputs.target)
    want = fn(inputs.student_logits, inputs.teacher_logits, pseudo, mask=inputs.mask, **hyper)
    assert torch.allclose(term(inputs, num_valid=rows.sum()), want, atol=1e-6)
    skip = build_loss(config({name: hyper}).loss[name])
    assert not torch.allclose(skip(inputs), want)  # the policy changes the value


def test_forward_then_reverse_kl_schedule_switches_terms_at_an_epoch():
    cfg = config({"forward_kl": {"until_epoch": 3}, "reverse_kl": {"from_epoch": 3, "warmup_epochs": 2}}).loss
    objective = build_objective(cfg)
    fwd = [objective.weight_at("forward_kl", e) for e in (0.0, 2.9, 3.0, 9.0)]
    rev = [objective.weight_at("reverse_kl", e) for e in (0.0, 2.9, 3.0, 4.0, 5.0, 9.0)]
    assert fwd == [1.0, 1.0, 0.0, 0.0]
    assert rev == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]  # the warm-up starts at from_epoch
    with pytest.raises(ConfigError, match="until_epoch=2.0 must be after from_epoch=2.0"):
        config({"forward_kl": {"from_epoch": 2, "until_epoch": 2}})
