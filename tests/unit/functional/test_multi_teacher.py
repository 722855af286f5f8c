"""Several teachers combined: every rule against a hand computation and a float64 loop reference."""

import math
import zlib

import pytest
import torch

from distillery.functional import agreement_mask, combine_teachers, drop_members, member_weights
from tests.unit.functional.reference import softmax

LOG = torch.log


def _probs(rows):
    return LOG(torch.tensor(rows, dtype=torch.float64))


# two members, two rows, three classes (given as probabilities: their logs are logits)
P1 = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]
P2 = [[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]]
Z = _probs([P1, P2])


# ---- hand computations ---------------------------------------------------------------------------


def test_mean_is_the_average_probability():
    out = combine_teachers(Z, "mean")
    want = torch.tensor([[0.55, 0.3, 0.15], [0.3, 0.425, 0.275]], dtype=torch.float64)
    assert torch.allclose(out.logits.exp(), want, atol=1e-12)
    assert torch.equal(out.weights, torch.full((2, 2), 0.5, dtype=torch.float64))
    assert out.keep.all()


def test_weighted_normalises_the_fixed_weights():
    out = combine_teachers(Z, "weighted", weights=torch.tensor([3.0, 1.0]))
    want = 0.75 * torch.tensor(P1, dtype=torch.float64) + 0.25 * torch.tensor(P2, dtype=torch.float64)
    assert torch.allclose(out.logits.exp(), want, atol=1e-12)
    assert torch.allclose(out.weights[:, 0], torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_entropy_confidence_by_hand():
    h = [[-sum(p * math.log(p) for p in row) for row in member] for member in (P1, P2)]
    for tau in (1.0, 0.5):
        out = combine_teachers(Z, "confidence", confidence="entropy", temperature=tau)
        for i in range(2):
            e = [math.exp(-h[k][i] / tau) for k in range(2)]
            w = [x / sum(e) for x in e]
            assert out.weights[:, i].tolist() == pytest.approx(w, abs=1e-12)
            mix = [w[0] * a + w[1] * b for a, b in zip(P1[i], P2[i])]
            assert out.logits[i].exp().tolist() == pytest.approx(mix, abs=1e-12)
    # row 1: member 1 (0.7, 0.2, 0.1) is surer than member 2 (0.4, 0.4, 0.2) and weighs more
    assert out.weights[0, 0] > out.weights[1, 0]


def test_label_confidence_is_proportional_to_the_labels_probability():
    y = torch.tensor([0, 1])
    out = combine_teachers(Z, "confidence", confidence="label", target=y)
    # row 1: p(y=0) = 0.7 and 0.4; row 2: p(y=1) = 0.6 and 0.25
    assert out.weights[:, 0].tolist() == pytest.approx([0.7 / 1.1, 0.4 / 1.1], abs=1e-12)
    assert out.weights[:, 1].tolist() == pytest.approx([0.6 / 0.85, 0.25 / 0.85], abs=1e-12)
    sharp = combine_teachers(Z, "confidence", confidence="label", target=y, temperature=0.5)
    assert sharp.weights[:, 0].tolist() == pytest.approx([0.49 / 0.65, 0.16 / 0.65], abs=1e-12)  # p(y)^2


def test_label_confidence_uses_the_entropy_on_unlabelled_rows():
    y = torch.tensor([-100, 1])
    out = combine_teachers(Z, "confidence", confidence="label", target=y)
    by_entropy = combine_teachers(Z, "confidence", confidence="entropy")
    assert torch.allclose(out.weights[:, 0], by_entropy.weights[:, 0])
    assert out.weights[:, 1].tolist() == pytest.approx([0.6 / 0.85, 0.25 / 0.85], abs=1e-12)


def test_agreement_keeps_the_rows_whose_top1_agree_and_targets_the_mean():
    out = combine_teachers(Z, "agreement")
    # row 1: both argmax 0 (member 2 ties 0 and 1: the first wins); row 2: 1 against 0
    assert out.keep.tolist() == [True, False]
    assert torch.allclose(out.logits, combine_teachers(Z, "mean").logits)
    three = _probs([[[0.6, 0.4]], [[0.7, 0.3]], [[0.2, 0.8]]])
    assert agreement_mask(three).tolist() == [False]
    assert agreement_mask(three, torch.tensor([True, True, False])).tolist() == [
        True
    ]  # the dissenter dropped


def test_dropped_members_get_no_weight_and_the_others_renormalise():
    p3 = [[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]
    z = _probs([P1, P2, p3])
    keep = torch.tensor([True, False, True])
    mean = combine_teachers(z, "mean", members=keep)
    assert torch.allclose(mean.logits, combine_teachers(z[[0, 2]], "mean").logits, atol=1e-12)
    assert mean.weights[1].eq(0).all()
    weighted = combine_teachers(z, "weighted", weights=torch.tensor([1.0, 5.0, 3.0]), members=keep)
    assert weighted.weights[:, 0].tolist() == pytest.approx([0.25, 0.0, 0.75])
    conf = combine_teachers(z, "confidence", members=keep)
    ref = combine_teachers(z[[0, 2]], "confidence")
    assert torch.allclose(conf.weights[[0, 2]], ref.weights) and conf.weights[1].eq(0).all()
    assert torch.allclose(conf.logits, ref.logits, atol=1e-12)
    # member 1 alone: its own distribution, every row kept
    alone = combine_teachers(z, "agreement", members=torch.tensor([True, False, False]))
    assert torch.allclose(alone.logits, z[0].log_softmax(-1), atol=1e-12) and alone.keep.all()


# ---- an independent float64 loop reference -------------------------------------------------------


def _reference(logits, combine, weights=None, confidence="entropy", tau=1.0, target=None, keep=None):
    """Per row (flattened leading dims): the members' weights, the combined probabilities, kept or not."""
    k, c = logits.shape[0], logits.shape[-1]
    rows = logits.reshape(k, -1, c).tolist()
    labels = None if target is None else target.reshape(-1).tolist()
    keep = [True] * k if keep is None else keep
    out = []
    for i in range(len(rows[0])):
        probs = [softmax(rows[m][i]) for m in range(k)]
        kept = [m for m in range(k) if keep[m]]
        if combine in ("mean", "agreement"):
            w = [1.0 / len(kept) if keep[m] else 0.0 for m in range(k)]
        elif combine == "weighted":
            total = sum(weights[m] for m in kept)
            w = [weights[m] / total if keep[m] else 0.0 for m in range(k)]
        else:
            scores = []
            for m in range(k):
                p = probs[m]
                if confidence == "label" and labels[i] != -100:
                    s = math.log(p[labels[i]])
                else:
                    s = sum(x * math.log(x) for x in p if x > 0)
                scores.append(s / tau)
            top = max(scores[m] for m in kept)
            e = [math.exp(scores[m] - top) if keep[m] else 0.0 for m in range(k)]
            w = [x / sum(e) for x in e]
        mix = [sum(w[m] * probs[m][j] for m in range(k)) for j in range(c)]
        tops = {max(range(c), key=lambda j, m=m: rows[m][i][j]) for m in kept}
        out.append((w, mix, len(tops) == 1))
    return out


CASES = [
    ("mean", {}),
    ("weighted", {"weights": [0.2, 0.5, 0.3]}),
    ("confidence", {"confidence": "entropy", "tau": 0.7}),
    ("confidence", {"confidence": "label", "tau": 2.0}),
    ("agreement", {}),
]


@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 2, 3, 6)])  # classifier rows [B, C]; token rows [B, L, V]
@pytest.mark.parametrize("combine,kw", CASES)
@pytest.mark.parametrize("keep", [None, [True, False, True]])
def test_against_the_loop_reference(shape, combine, kw, keep):
    # a seed fixed per case (hash() of a string changes with every interpreter: PYTHONHASHSEED)
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, combine)).encode()))
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    # every member leans to class 0 on about half the rows: agreement keeps some rows and drops others
    logits[..., 0] += 8.0 * (torch.rand(shape[1:-1], generator=g) > 0.5)
    target = torch.randint(0, shape[-1], shape[1:-1], generator=g)
    target.view(-1)[::3] = -100  # rows without a label (transfer examples, prompt tokens)
    kw = dict(kw)
    tau = kw.pop("tau", 1.0)
    weights = kw.pop("weights", None)
    out = combine_teachers(
        logits,
        combine,
        weights=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        temperature=tau,
        target=target,
        members=None if keep is None else torch.tensor(keep),
        **kw,
    )
    ref = _reference(logits, combine, weights, kw.get("confidence", "entropy"), tau, target, keep)
    k, c = shape[0], shape[-1]
    assert out.logits.dtype == torch.float64 and out.logits.shape == shape[1:]
    got_w = out.weights.reshape(k, -1).T.tolist()
    got_p = out.logits.exp().reshape(-1, c).tolist()
    got_keep = out.keep.reshape(-1).tolist()
    for i, (w, mix, agree) in enumerate(ref):
        assert got_w[i] == pytest.approx(w, abs=1e-10)
        assert got_p[i] == pytest.approx(mix, abs=1e-10)
        assert got_keep[i] == (agree if combine == "agreement" else True)
    if combine == "agreement":
        assert 0 < sum(got_keep) < len(got_keep)


# ---- numerics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine,kw", CASES)
def test_large_logits_stay_finite_and_shifts_change_nothing(combine, kw):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 5, generator=g)
    kw = {k: v for k, v in kw.items() if k != "tau"}
    if "weights" in kw:
        kw["weights"] = torch.tensor(kw["weights"])
    target = torch.tensor([0, 1, -100, 4])
    base = combine_teachers(z, combine, target=target, **kw)
    shift = 1e4 * torch.randn(3, 4, 1, generator=g)  # each member's rows moved by its own constant
    shifted = combine_teachers(z + shift, combine, target=target, **kw)  # z + 1e4 holds ~1e-3 of z in float32
    assert torch.allclose(base.logits, shifted.logits, atol=5e-3)
    assert torch.allclose(base.weights, shifted.weights, atol=5e-3)
    wide = combine_teachers(z.double() + 1e8 * shift.double(), combine, target=target, **kw)  # float64: 1e12
    assert torch.allclose(base.logits.double(), wide.logits, atol=1e-3)
    huge = combine_teachers(z * 1e4, combine, target=target, **kw)  # near one-hot members
    assert torch.isfinite(huge.weights).all() and not torch.isnan(huge.logits).any()
    assert torch.allclose(huge.logits.logsumexp(-1), torch.zeros(4), atol=1e-5)
    assert base.logits.dtype == torch.float32
    assert combine_teachers(z.half(), combine, target=target, **kw).logits.dtype == torch.float32


def test_padded_vocabulary_slots_stay_without_mass_and_nothing_is_nan():
    z = torch.randn(2, 3, 5)
    z[..., 4] = float("-inf")  # a padded slot no member gives mass
    for combine, kw in [
        ("mean", {}),
        ("confidence", {}),
        ("confidence", {"confidence": "label"}),
        ("agreement", {}),
    ]:
        out = combine_teachers(z, combine, target=torch.tensor([4, 0, 1]), **kw)  # row 1's label has no mass
        assert torch.isfinite(out.weights).all(), combine
        assert torch.isneginf(out.logits[..., 4]).all() and torch.isfinite(out.logits[..., :4]).all(), combine
    out = combine_teachers(z, "confidence", confidence="label", target=torch.tensor([4, 0, 1]))
    assert torch.allclose(out.weights[:, 0], torch.full((2,), 0.5))  # no member gives the label mass: uniform


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_teachers(Z, "median")
    with pytest.raises(ValueError, match="needs weights"):
        member_weights(Z, "weighted")
    with pytest.raises(ValueError, match="3 entries for 2 members"):
        member_weights(Z, "weighted", weights=torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        member_weights(Z, "weighted", weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        member_weights(Z, "weighted", weights=torch.tensor([0.0, 1.0]), members=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="keeps no member"):
        member_weights(Z, "mean", members=torch.tensor([False, False]))
    with pytest.raises(ValueError, match="needs the rows' labels"):
        member_weights(Z, "confidence", confidence="label")
    with pytest.raises(ValueError, match="leading shape"):
        member_weights(Z, "confidence", confidence="label", target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        member_weights(Z, "confidence", temperature=0.0)


# ---- teacher dropping ----------------------------------------------------------------------------


def test_drop_members_by_count_and_by_probability():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([drop_members(4, 1, g) for _ in range(400)])
    assert (draws.sum(1) == 3).all()
    assert ((~draws).sum(0) > 60).all()  # every member is dropped sometimes (uniform: 100 each)
    assert drop_members(4, 0).all()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([drop_members(3, 0.9, g) for _ in range(300)])
    assert (draws.sum(1) >= 1).all()  # one member always stays
    a = [drop_members(5, 0.5, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]  # a seeded draw is reproducible
    for bad in (4, -1, 1.0, -0.1):
        with pytest.raises(ValueError):
            drop_members(4, bad)
