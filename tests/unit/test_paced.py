"""PACED: pass-rate weights, per-row weighted loss terms, the weighting batch transform."""

import math

import pytest
import torch
from torch import nn

from distillery import functional as DF
from distillery.data import ArrayDataset
from distillery.data.text.arithmetic import verify
from distillery.functional.paced import expand_row_weight, paced_weights, weighted_row_mean
from distillery.generation import OnPolicyBatches, PacedBatches, build_batch
from distillery.generation import paced as paced_module
from distillery.losses import LOSSES, LossInputs, LossTerm, Objective
from distillery.losses.logit import (
    CrossEntropyLoss,
    DKDLoss,
    ForwardKLLoss,
    JSDLoss,
    KDLoss,
    NKDLoss,
    ReverseKLLoss,
    USKDLoss,
)
from distillery.train import TrainConfig, fit

# ----------------------------------------------------------------------------------------------------
# paced_weights
# ----------------------------------------------------------------------------------------------------


def test_paced_weights_hand_values():
    p = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert paced_weights(p).tolist() == [0.0, 0.75, 1.0, 0.75, 0.0]  # p(1-p) / (1/4)
    raw = paced_weights(p, a=2.0, b=1.0, normalize=False)
    assert torch.allclose(raw, p**2 * (1 - p))
    # normaliser: the kernel at its mode a/(a+b) = 2/3 is (2/3)^2 (1/3) = 4/27
    assert torch.allclose(paced_weights(p, a=2.0, b=1.0), raw * 27 / 4)
    assert paced_weights(torch.tensor([0.3]), a=0.0, b=0.0).tolist() == [1.0]
    assert paced_weights(torch.tensor([0.0, 1.0]), a=0.0, b=2.0).tolist() == [1.0, 0.0]  # 0^0 = 1
    assert paced_weights(torch.tensor([1, 2, 3]) / 4).dtype == torch.float32
    assert paced_weights(torch.tensor([0, 1])).tolist() == [0.0, 0.0]  # integer rates converted


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (2.0, 1.0), (0.5, 3.0), (3.0, 0.5)])
def test_paced_weights_vanish_at_the_ends_and_peak_at_the_mode(a, b):
    grid = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    w = paced_weights(grid, a, b)
    assert w[0] == 0 and w[-1] == 0
    assert abs(grid[w.argmax()].item() - a / (a + b)) < 1e-3
    assert math.isclose(w.max().item(), 1.0, rel_tol=1e-6)
    mode = torch.tensor([a / (a + b)], dtype=torch.float64)
    assert math.isclose(paced_weights(mode, a, b).item(), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("p", "a", "b", "message"),
    [
        ([0.5], -1.0, 1.0, "exponents must be >= 0"),
        ([0.5], 1.0, -0.5, "exponents must be >= 0"),
        ([0.5], float("nan"), 1.0, "exponents must be >= 0"),
        ([0.5, 1.5], 1.0, 1.0, "pass rates must lie in \\[0, 1\\]; got 1.5"),
        ([-0.1], 1.0, 1.0, "pass rates must lie in \\[0, 1\\]"),
        ([float("nan")], 1.0, 1.0, "pass rates must lie in \\[0, 1\\]"),
    ],
)
def test_paced_weights_validation(p, a, b, message):
    with pytest.raises(ValueError, match=message):
        paced_weights(torch.tensor(p), a, b)


def test_expand_row_weight():
    w = torch.tensor([1.0, 0.5])
    assert expand_row_weight(w, (2, 3)).tolist() == [[1.0] * 3, [0.5] * 3]
    full = torch.rand(2, 3)
    assert expand_row_weight(full, (2, 3)) is full
    with pytest.raises(ValueError, match="do not fit rows"):
        expand_row_weight(torch.ones(3), (2, 3))
    with pytest.raises(ValueError, match="do not fit rows"):
        expand_row_weight(torch.ones(2, 3, 1), (2, 3))


def test_weighted_row_mean_counts_only_selected_rows():
    v = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])  # a value outside the rows never leaks in
    rows = torch.tensor([[True, True], [True, False]])
    w = torch.tensor([2.0, 1.0])
    assert weighted_row_mean(v, w, rows).item() == (2 + 4 + 3) / 3
    assert weighted_row_mean(v, w, rows, num_valid=9).item() == 1.0
    assert weighted_row_mean(v, w, rows, num_valid=torch.tensor(0.0)).item() == 9.0  # clamped to 1


# ----------------------------------------------------------------------------------------------------
# Weighted loss terms against a naive per-row loop (float64)
# ----------------------------------------------------------------------------------------------------


def _token_inputs(seed=0, b=3, t=5, c=6, dtype=torch.float64, weight=True):
    """Token rows [B, T]: padding (mask False) and unlabelled prompt rows (target -100)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, c, generator=g, dtype=dtype, requires_grad=True)
    te = 2 * torch.randn(b, t, c, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    y[0, :2] = -100
    y[~mask] = -100
    w = torch.rand(b, generator=g, dtype=dtype) if weight else None
    return LossInputs(student_logits=s, target=y, mask=mask, teacher_logits=te, row_weight=w)


def _kl(p, log_p, log_q):
    return sum(p[k] * (log_p[k] - log_q[k]) for k in range(len(p)) if p[k] > 0)


def _naive_ce(s, t, y):
    return -torch.log_softmax(s, -1)[y]


def _naive_forward_kl(s, t, y, temperature=2.0):
    lt, ls = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    return temperature**2 * _kl(lt.exp(), lt, ls)


def _naive_jsd(s, t, y, beta=0.3, temperature=2.0):
    pt, ps = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    m = beta * pt + (1 - beta) * ps
    return temperature**2 * (beta * _kl(pt, pt.log(), m.log()) + (1 - beta) * _kl(ps, ps.log(), m.log()))


def _naive_dkd(s, t, y, alpha=0.5, beta=4.0, temperature=3.0):
    pt, ps = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    bt = torch.stack([pt[y], 1 - pt[y]])
    bs = torch.stack([ps[y], 1 - ps[y]])
    others = [k for k in range(len(pt)) if k != y]
    qt = pt[others] / pt[others].sum()
    qs = ps[others] / ps[others].sum()
    return temperature**2 * (alpha * _kl(bt, bt.log(), bs.log()) + beta * _kl(qt, qt.log(), qs.log()))


# term, naive per-row loss, whether the term skips unlabelled rows
NAIVE = {
    "ce": (CrossEntropyLoss(), _naive_ce, True),
    "forward_kl": (ForwardKLLoss(temperature=2.0), _naive_forward_kl, False),
    "jsd": (JSDLoss(beta=0.3, temperature=2.0), _naive_jsd, False),
    "dkd": (DKDLoss(alpha=0.5, beta=4.0, temperature=3.0), _naive_dkd, True),
}


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_weighted_term_equals_a_naive_weighted_loop(name):
    term, naive, labelled_only = NAIVE[name]
    inputs = _token_inputs()
    num_valid = term.rows(inputs.target, inputs.mask).sum() + 2  # a larger global count
    got = term(inputs, num_valid)
    (g_got,) = torch.autograd.grad(got, inputs.student_logits)
    total = 0.0
    for i in range(inputs.mask.shape[0]):
        for j in range(inputs.mask.shape[1]):
            y = int(inputs.target[i, j])
            if not inputs.mask[i, j] or (labelled_only and y == -100):
                continue
            s, t = inputs.student_logits[i, j], inputs.teacher_logits[i, j]
            total = total + inputs.row_weight[i] * naive(s, t, y)
    want = total / num_valid
    (g_want,) = torch.autograd.grad(want, inputs.student_logits)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_got, g_want, rtol=1e-8, atol=1e-12)


def _every_term():
    return {
        "ce": CrossEntropyLoss(label_smoothing=0.1),
        "forward_kl": ForwardKLLoss(temperature=2.0),
        "kd": KDLoss(temperature=2.0, alpha=0.7),
        "reverse_kl": ReverseKLLoss(temperature=1.5),
        "jsd": JSDLoss(beta=0.3),
        "tvd": LOSSES["tvd"][1](),
        "skew_kl": LOSSES["skew_kl"][1](alpha=0.2),
        "skew_reverse_kl": LOSSES["skew_reverse_kl"][1](alpha=0.2),
        "dkd": DKDLoss(),
        "dkd_teacher": DKDLoss(unlabelled="teacher"),
        "nkd": NKDLoss(),
        "uskd": USKDLoss(),
    }


def test_every_registered_term_over_logits_or_hints_supports_row_weights():
    from distillery.losses.representation import REPRESENTATION_LOSSES
    from distillery.losses.self_supervised import SELF_SUPERVISED_LOSSES

    # terms over signals or views, and deit (over the distillation head's features)
    others = set(REPRESENTATION_LOSSES) | set(SELF_SUPERVISED_LOSSES) | {"deit"}
    assert all(cls.supports_row_weight for name, (_, cls) in LOSSES.items() if name not in others)


def test_a_representation_term_given_row_weights_is_refused_not_ignored():
    from distillery.losses import build_objective
    from distillery.losses.representation import FeaturesConfig

    objective = build_objective({"features": FeaturesConfig(student="a", teacher="b")})
    feats = {"features.0": torch.zeros(2, 3)}
    inputs = LossInputs(
        None, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), None, feats, feats
    )
    inputs.row_weight = torch.ones(2)
    with pytest.raises(ValueError, match="cannot weight their rows"):
        objective(inputs)


@pytest.mark.parametrize("name", sorted(_every_term()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_of_ones_equal_the_unweighted_path_exactly(name, dtype):
    term = _every_term()[name]
    plain = _token_inputs(seed=1, dtype=dtype, weight=False)
    num_valid = term.counts(plain.target, plain.mask)  # its rows' count; kd: [valid, labelled]
    ones = LossInputs(**{**plain.__dict__, "row_weight": torch.ones(3, dtype=dtype)})
    for n in (num_valid, None):
        a, b = term(plain, n), term(ones, n)
        assert torch.equal(a, b), (a.item(), b.item())
        ga = torch.autograd.grad(a, plain.student_logits)[0]
        gb = torch.autograd.grad(b, ones.student_logits)[0]
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("name", sorted(set(_every_term()) - {"uskd"}))  # uskd: batch-mean soft labels
def test_weighted_halves_with_the_global_count_sum_to_the_whole_batch(name):
    objective = Objective({name: _every_term()[name]})
    whole = _token_inputs(seed=2, b=4)
    counts = objective.counts(whole.target, whole.mask)
    full = objective(whole, counts)[name]
    (g_full,) = torch.autograd.grad(full, whole.student_logits)
    halves, grads = 0.0, []
    for part in (slice(0, 1), slice(1, 4)):
        sub = LossInputs(
            student_logits=whole.student_logits[part].detach().requires_grad_(),
            target=whole.target[part],
            mask=whole.mask[part],
            teacher_logits=whole.teacher_logits[part],
            row_weight=whole.row_weight[part],
        )
        value = objective(sub, counts)[name]
        grads.append(torch.autograd.grad(value, sub.student_logits)[0])
        halves = halves + value.detach()
    assert torch.allclose(halves, full.detach(), rtol=1e-10)
    assert torch.allclose(torch.cat(grads), g_full, rtol=1e-8, atol=1e-14)


def test_weights_scale_contributions_not_the_normaliser():
    term = ForwardKLLoss()
    inputs = _token_inputs(seed=3, weight=False)
    base = term(inputs)
    halved = LossInputs(**{**inputs.__dict__, "row_weight": torch.full((3,), 0.5, dtype=torch.float64)})
    assert torch.allclose(term(halved), 0.5 * base)
    zero = LossInputs(**{**inputs.__dict__, "row_weight": torch.zeros(3, dtype=torch.float64)})
    assert term(zero).item() == 0.0


def test_objective_refuses_weights_for_a_term_that_cannot_use_them():
    class Plain(LossTerm):
        needs_teacher = False

        def forward(self, inputs, num_valid=None):
            return inputs.student_logits.sum()

    inputs = _token_inputs()
    with pytest.raises(ValueError, match=r"loss term\(s\) \['plain'\] cannot weight their rows"):
        Objective({"plain": Plain(), "ce": CrossEntropyLoss()})(inputs)
    Objective({"plain": Plain()})(LossInputs(**{**inputs.__dict__, "row_weight": None}))


# ----------------------------------------------------------------------------------------------------
# The loop: a "row_weight" key of the batch reaches the loss terms
# ----------------------------------------------------------------------------------------------------


def _fit(transform):
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g), torch.arange(16)
    )
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    cfg = TrainConfig(steps=3, batch_size=8, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0})
    objective = Objective({"ce": CrossEntropyLoss()})
    return fit(model, data, objective, cfg, progress=False, batch_transform=transform).model


def _with_weight(value):
    def transform(batch, student, step):
        return {**batch, "row_weight": torch.full((batch["x"].shape[0],), value)}

    return transform


def test_loop_passes_row_weights_to_the_terms():
    plain, ones, zeros = _fit(None), _fit(_with_weight(1.0)), _fit(_with_weight(0.0))
    assert torch.equal(plain.weight, ones.weight)  # weights of one: the unweighted run, bit for bit
    torch.manual_seed(0)
    assert torch.equal(zeros.weight, nn.Linear(4, 3).weight)  # weight 0: no gradient, no change


# ----------------------------------------------------------------------------------------------------
# PacedBatches
# ----------------------------------------------------------------------------------------------------

CHARS = "0123456789+-*= "
PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """ids 0/1/2 = <pad>/<bos>/<eos>, then one id per character of CHARS."""

    eos_token = "<eos>"

    def encode(self, text):
        return [3 + CHARS.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=False):
        special = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}
        out = []
        for i in ids:
            if i in special:
                out.append("" if skip_special_tokens else special[i])
            else:
                out.append(CHARS[i - 3])
        return "".join(out)


TOK = CharTokenizer()


class ScriptedStudent(nn.Module):
    """``generate`` answers each prompt with the next of its scripted completions (texts).

    Like Hugging Face ``generate``: a row without ``<eos>`` runs to ``max_new_tokens``; finished rows
    are padded."""

    def __init__(self, script):
        super().__init__()
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = 0

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls += 1
        rows = []
        for ids in input_ids.tolist():
            prompt = TOK.decode(ids, skip_special_tokens=True)
            text = self.script[prompt].pop(0)
            done = text.endswith("<eos>")
            rows.append(TOK.encode(text.removesuffix("<eos>")) + ([EOS] if done else []))
            assert done or len(rows[-1]) == generation_config.max_new_tokens
        width = max(map(len, rows))
        new = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def _arith_batch(pairs):
    prompts = [[BOS, *TOK.encode(p)] for p, _ in pairs]
    responses = [[*TOK.encode(r), EOS] for _, r in pairs]
    batch = build_batch(prompts, responses, pad_id=PAD, index=torch.arange(len(pairs)))
    return batch


def _paced(**kw):
    check = lambda prompt, completion: verify(prompt, completion, eos=TOK.eos_token)  # noqa: E731
    return PacedBatches(check, TOK, max_new_tokens=4, pad_id=PAD, eos_id=EOS, **kw)


SCRIPT = {
    "1+1=": ["2<eos>", "3<eos>", "2<eos>", "2   "],  # 3/4: the last one hit the cap but reads "2"
    "2+3=": ["4<eos>", "6<eos>", "1<eos>", "<eos>"],  # 0/4
    "4+4=": ["8<eos>"] * 4,  # 4/4
    "5+5=": ["10<eos>", "01<eos>", "10<eos>", "1<eos>"],  # 2/4
}


def test_paced_batches_pass_rates_and_weights():
    batch = _arith_batch([("1+1=", "2"), ("2+3=", "5"), ("4+4=", "8"), ("5+5=", "10")])
    before = {k: v.clone() for k, v in batch.items()}
    transform = _paced(samples=4)
    student = ScriptedStudent(SCRIPT)
    out = transform(batch, student, step=0)
    assert student.calls == 1  # every prompt's samples in one batched call
    assert out["row_weight"].dtype == torch.float32
    assert out["row_weight"].tolist() == [0.75, 0.0, 0.0, 1.0]  # 4 p (1 - p) at p = 3/4, 0, 1, 1/2
    assert out is not batch and "row_weight" not in batch
    for k, v in before.items():  # the training tokens are untouched
        assert out[k] is batch[k] and torch.equal(out[k], v)
    m = transform.metrics()
    assert m["pass_rate"] == (0.75 + 0 + 1 + 0.5) / 4 and m["weight"] == 1.75 / 4
    assert m["solved"] == 0.25 and m["unsolved"] == 0.25 and m["estimated"] == 1.0
    assert m["mean_pass_rate"] == m["pass_rate"] and m["mean_weight"] == m["weight"]


def test_paced_batches_exponents_and_repeated_prompts():
    batch = _arith_batch([("1+1=", "2"), ("5+5=", "10"), ("1+1=", "2")])
    transform = _paced(samples=4, a=2.0, b=1.0, normalize=False)
    student = ScriptedStudent(SCRIPT)
    w = transform(batch, student, step=0)["row_weight"]
    assert torch.allclose(w, torch.tensor([0.75**2 * 0.25, 0.25 * 0.5, 0.75**2 * 0.25]))
    assert len(student.script["1+1="]) == 0  # a repeated prompt is sampled once (4 samples, not 8)


def test_paced_batches_reuse_pass_rates_for_every_steps():
    batch = _arith_batch([("4+4=", "8")])
    student = ScriptedStudent({"4+4=": ["8<eos>"] * 4 + ["7<eos>"] * 4 + ["8<eos>", "7<eos>"] * 2})
    transform = _paced(samples=4, every=2)
    assert transform(batch, student, step=0)["row_weight"].tolist() == [0.0]  # p = 1
    assert transform(batch, student, step=1)["row_weight"].tolist() == [0.0]  # cached
    assert student.calls == 1 and transform.metrics()["estimated"] == 0.0
    assert transform(batch, student, step=2)["row_weight"].tolist() == [0.0]  # p = 0
    assert transform(batch, student, step=4)["row_weight"].tolist() == [1.0]  # p = 1/2
    assert student.calls == 3


def test_paced_batches_pass_batches_unchanged_before_from_step():
    batch = _arith_batch([("1+1=", "2"), ("5+5=", "10")])
    student = ScriptedStudent(SCRIPT)
    transform = _paced(samples=4, from_step=3)
    assert transform(batch, student, step=2) is batch and student.calls == 0  # no sampling, no weights
    assert transform.metrics()["mean_weight"] == 0.0 and transform.rows_seen == 0
    assert transform(batch, student, step=3)["row_weight"].tolist() == [0.75, 1.0]
    assert student.calls == 1


def _tiny_lm():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=3 + len(CHARS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def test_paced_batches_are_deterministic_by_seed_step_and_batch(monkeypatch):
    seen = []
    real = paced_module.generate_completions

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["seed"], out))
        return out

    monkeypatch.setattr(paced_module, "generate_completions", spy)
    # a verifier that accepts about half of random completions, so that pass rates vary
    check = lambda prompt, completion: len(completion) % 2 == 0  # noqa: E731
    lm = _tiny_lm()
    assert lm.training
    batch = _arith_batch([("1+1=", "2"), ("2+3=", "5"), ("12+3=", "15")])
    runs = []
    for _ in range(2):
        t = PacedBatches(check, TOK, samples=6, max_new_tokens=5, seed=7, pad_id=PAD, eos_id=EOS)
        runs.append(t(batch, lm, step=3)["row_weight"])
    assert torch.equal(runs[0], runs[1]) and seen[0] == seen[1]
    t = PacedBatches(check, TOK, samples=6, max_new_tokens=5, seed=7, pad_id=PAD, eos_id=EOS)
    t(batch, lm, step=4)
    t = PacedBatches(check, TOK, samples=6, max_new_tokens=5, seed=8, pad_id=PAD, eos_id=EOS)
    t(batch, lm, step=3)
    assert len({s for s, _ in seen}) == 3  # other step, other seed: other samples
    assert seen[0][1] != seen[2][1]
    assert lm.training  # the mode is restored


def test_paced_weights_survive_on_policy_sampling():
    """Chained before on-policy sampling, the per-row weights follow their prompts."""
    lm = _tiny_lm()
    batch = _arith_batch([("1+1=", "2"), ("2+3=", "5")])
    weighted = _paced(samples=2)(batch, lm, step=0)
    sampled = OnPolicyBatches(1.0, max_new_tokens=3, pad_id=PAD, eos_id=EOS)(weighted, lm, step=0)
    assert sampled["row_weight"] is weighted["row_weight"]
    assert sampled["input_ids"][:, :5].tolist() == batch["input_ids"][:, :5].tolist()  # prompts kept


def test_paced_batches_validate_arguments():
    for kw, message in [
        ({"samples": 0}, "samples must be >= 1"),
        ({"a": -1.0}, "exponents must be >= 0"),
        ({"every": 0}, "every must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"from_step": -1}, "from_step must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            _paced(**kw)


def test_dkd_reference_matches_the_library_unweighted():
    """The naive DKD of this file is the library's (so the weighted comparison tests the weights)."""
    inputs = _token_inputs(seed=5, weight=False)
    rows = inputs.mask & (inputs.target != -100)
    want = DF.dkd_loss(
        inputs.student_logits, inputs.teacher_logits, inputs.target, alpha=0.5, beta=4.0, temperature=3.0,
        mask=rows, reduction="none",
    )  # fmt: skip
    for i, j in rows.nonzero().tolist():
        s, t = inputs.student_logits[i, j], inputs.teacher_logits[i, j]
        assert torch.allclose(_naive_dkd(s, t, int(inputs.target[i, j])), want[i, j])
