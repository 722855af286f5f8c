"""MultiTeacher: the combination it serves, its drops per step, its contribution counts, exact resume."""

import io
import os
import signal

import pytest
import torch
from torch import nn

from distillery.data import ArrayDataset
from distillery.errors import ConfigError, RunInterrupted
from distillery.functional import combine_teachers
from distillery.losses import CrossEntropyLoss, ForwardKLLoss, Objective
from distillery.models.adapters import TEACHER_ROW_WEIGHT, ModelOutput
from distillery.teachers import BaseTeacher, FrozenTeacher, MultiTeacher, Teacher
from distillery.train import TrainConfig, fit


def _net(seed, d=6, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes))


def _batch(n=8, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[::3] = -100
    return {"x": torch.randn(n, d, generator=g), "y": y, "index": torch.arange(n)}


class Fixed(BaseTeacher):
    """Serves fixed logits, whatever the batch."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = 0

    def __call__(self, batch, student_output=None):
        self.calls += 1
        return ModelOutput(logits=self.logits)


class TokenRows:
    """Rows of a language model's batch: labels [B, L] with -100 on prompt and padding tokens."""

    def rows(self, batch):
        return batch["labels"], batch["labels"] != -100


def test_it_is_a_teacher_and_serves_the_functional_combination():
    nets = [_net(s) for s in (1, 2, 3)]
    batch = _batch()
    members = torch.stack([FrozenTeacher(n)(batch).logits for n in nets])
    for combine, kw in [
        ("mean", {}),
        ("weighted", {"weights": [1.0, 2.0, 1.0]}),
        ("confidence", {"confidence": "label", "temperature": 0.5}),
        ("agreement", {}),
    ]:
        teacher = MultiTeacher(nets, combine, **kw)
        assert isinstance(teacher, Teacher)
        out = teacher(batch)
        want = combine_teachers(
            members,
            combine,
            weights=None if "weights" not in kw else torch.tensor(kw["weights"]),
            confidence=kw.get("confidence", "entropy"),
            temperature=kw.get("temperature", 1.0),
            target=batch["y"],
        )
        assert torch.allclose(out.logits, want.logits) and not out.logits.requires_grad
        if combine == "agreement":
            assert torch.equal(out.features[TEACHER_ROW_WEIGHT], want.keep.float())
        else:
            assert out.features == {}  # every row counts: no per-row weights, the loss's fast path


def test_language_model_rows_with_ignored_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 7, generator=g)  # 3 members, [B=2, L=5, V=7]
    logits[:, 0, :2, 3] += 10.0  # the members agree on the first two tokens of sequence 1
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :1] = -100  # a prompt token
    labels[1, 3:] = -100  # padding
    teacher = MultiTeacher([Fixed(z) for z in logits], "confidence", confidence="label", adapter=TokenRows())
    out = teacher({"labels": labels})
    want = combine_teachers(logits, "confidence", confidence="label", target=labels)
    assert out.logits.shape == (2, 5, 7) and torch.allclose(out.logits, want.logits)
    assert teacher.rows == int((labels != -100).sum())  # only the valid rows are counted
    agree = MultiTeacher([Fixed(z) for z in logits], "agreement", adapter=TokenRows())
    weight = agree({"labels": labels}).features[TEACHER_ROW_WEIGHT]
    assert weight.shape == (2, 5) and weight[0, :2].eq(1).all()


def test_members_with_other_output_sizes_are_one_clear_error():
    teacher = MultiTeacher([Fixed(torch.zeros(4, 10)), Fixed(torch.zeros(4, 3))], names=["ten", "three"])
    with pytest.raises(ConfigError, match=r"different shapes \(ten \[4, 10\], three \[4, 3\]\)"):
        teacher({"y": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least 2 members"):
        MultiTeacher([Fixed(torch.zeros(4, 3))])
    with pytest.raises(ValueError, match='combine="weighted"'):
        MultiTeacher([_net(1), _net(2)], "mean", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="drop=2 members of 2"):
        MultiTeacher([_net(1), _net(2)], drop=2)


def test_drops_are_one_draw_per_step_seeded_and_renormalised():
    a, b, c = (Fixed(torch.randn(4, 3)) for _ in range(3))
    teacher = MultiTeacher([a, b, c], "mean", drop=1, seed=4)
    batch = {"y": torch.zeros(4, dtype=torch.long)}
    seen = []
    for step in range(12):
        keep = teacher.keep_at(step)
        assert int(keep.sum()) == 2
        for _ in range(2):  # two micro-batches of one step: the same members
            out = teacher(batch)
            kept = torch.stack([m.logits for m, k in zip((a, b, c), keep) if k])
            assert torch.allclose(out.logits, combine_teachers(kept, "mean").logits)
        seen.append(keep.tolist())
        teacher.update(None, step + 1)
    again = MultiTeacher([a, b, c], "mean", drop=1, seed=4)
    assert [again.keep_at(s).tolist() for s in range(12)] == seen  # a function of (seed, step)
    other = MultiTeacher([a, b, c], "mean", drop=1, seed=5)
    assert [other.keep_at(s).tolist() for s in range(12)] != seen
    # dropped members are not called at all
    assert a.calls + b.calls + c.calls == 12 * 2 * 2
    # counts: steps (not micro-batches), each member's drops, its mean weight (1/2 when kept)
    m = teacher.metrics()
    assert m["steps"] == 12 and m["rows"] == 12 * 2 * 4 and m["kept_fraction"] == 1.0
    for i, name in enumerate(teacher.names):
        dropped = sum(not k[i] for k in seen)
        assert m[f"dropped_steps@{name}"] == dropped
        assert m[f"weight@{name}"] == pytest.approx(0.5 * (12 - dropped) / 12)
    assert sum(m[f"weight@{n}"] for n in teacher.names) == pytest.approx(1.0)


def test_the_state_round_trips_through_a_checkpoint_and_resumes_exactly():
    nets = [_net(s) for s in (1, 2, 3)]
    batches = [_batch(seed=s) for s in range(8)]

    def run(teacher, steps):
        outs = []
        for step in steps:
            outs.append(teacher(batches[step]).logits)
            teacher.update(None, step + 1)
        return outs

    full = MultiTeacher(nets, "agreement", drop=0.4, seed=1)
    want = run(full, range(8))
    first = MultiTeacher(nets, "agreement", drop=0.4, seed=1)
    run(first, range(4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    resumed = MultiTeacher(nets, "agreement", drop=0.4, seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = run(resumed, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(want[4:], got))
    assert resumed.metrics() == full.metrics()
    with pytest.raises(ValueError, match="3 members; this one has 2"):
        MultiTeacher(nets[:2]).load_state_dict(full.state_dict())


def _data(n=48, d=6, classes=4):
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g), torch.arange(n)
    )


def _cfg(**kw):
    return TrainConfig(**{"steps": 10, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}, **kw})


def _objective():
    return Objective({"ce": CrossEntropyLoss(), "kl": ForwardKLLoss(2.0)})


def test_agreement_reaches_the_loss_terms_through_the_row_weights():
    data, teacher_net = _data(), _net(7)
    single = fit(
        _net(0), data, _objective(), _cfg(), teacher=FrozenTeacher(teacher_net), seed=3, progress=False
    )
    # two copies of one teacher always agree, and their mean is that teacher: the same run
    twice = fit(
        _net(0), data, _objective(), _cfg(), teacher=MultiTeacher([teacher_net, teacher_net], "agreement"),
        seed=3, progress=False,
    )  # fmt: skip
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(single.model.parameters(), twice.model.parameters())
    )
    # a teacher and its negation never agree: the teacher's term weighs every row 0, ce keeps them all,
    # and the student learns as with ce alone
    flipped = nn.Sequential(teacher_net, nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        flipped[1].weight.copy_(-torch.eye(4))
    never = fit(
        _net(0), data, _objective(), _cfg(), teacher=MultiTeacher([teacher_net, flipped], "agreement"),
        seed=3, progress=False,
    )  # fmt: skip
    assert never.last_losses["kl"] == 0.0 and never.last_losses["ce"] > 0.0
    ce_only = fit(_net(0), data, Objective({"ce": CrossEntropyLoss()}), _cfg(), seed=3, progress=False)
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(ce_only.model.parameters(), never.model.parameters())
    )


def test_fit_logs_the_contributions_and_resumes_the_drops_exactly(tmp_path):
    from distillery.train.logging import read_metrics

    data, nets = _data(), [_net(s) for s in (1, 2, 3)]

    def teacher():
        return MultiTeacher(nets, "confidence", drop=1, seed=2)

    cfg = _cfg(steps=12, log_every=3)
    full_teacher = teacher()
    full = fit(
        _net(0),
        data,
        _objective(),
        cfg,
        teacher=full_teacher,
        seed=3,
        run_dir=tmp_path / "full",
        progress=False,
    )
    logged = read_metrics(tmp_path / "full", "teacher")
    assert [r["step"] for r in logged] == [3, 6, 9, 12] and logged[-1]["steps"] == 12

    def press_ctrl_c(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        fit(_net(0), data, _objective(), cfg, teacher=teacher(), seed=3, run_dir=run_dir, progress=False,
            on_step=press_ctrl_c)  # fmt: skip
    resumed_teacher = teacher()
    resumed = fit(_net(0), data, _objective(), cfg, teacher=resumed_teacher, seed=3, run_dir=run_dir,
                  resume=True, progress=False)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    assert resumed_teacher.metrics() == pytest.approx(full_teacher.metrics())
