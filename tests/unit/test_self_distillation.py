"""Self-distillation teacher sources: EMA, past predictions (PS-KD), peers, deepest exit, snapshots."""

import copy

import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn

from distillery.config import load_config
from distillery.models import build_model
from distillery.models.adapters import ModelOutput
from distillery.models.peers import PeerGroup
from distillery.teachers import Teacher
from distillery.teachers.ema import EMATeacher, ema_update, momentum_schedule
from distillery.teachers.past_predictions import PastPredictionsTeacher
from distillery.teachers.stacked import DeepestExitTeacher, PeersTeacher


def _bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


# ---- EMA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9, 1.0])
def test_ema_update_is_exact_for_parameters_and_buffers(momentum):
    teacher, student = _bn_net(0), _bn_net(1)
    student.train()
    student(torch.randn(8, 3))  # moves BatchNorm running statistics and num_batches_tracked
    before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, momentum)
    after, s = teacher.state_dict(), student.state_dict()
    for name, value in after.items():
        if value.is_floating_point():
            want = momentum * before[name] + (1 - momentum) * s[name]
            assert torch.allclose(value, want, atol=1e-7), name
        else:  # integer buffers follow the student
            assert torch.equal(value, s[name]), name
    if momentum == 1.0:
        assert all(torch.equal(after[k], before[k]) for k in after if after[k].is_floating_point())
    if momentum == 0.0:
        assert all(torch.equal(after[k], s[k]) for k in after)


def test_ema_teacher_follows_its_schedule_and_round_trips_its_state():
    student = _bn_net(2)
    teacher = EMATeacher(student, 0.5, momentum_end=1.0, total_steps=3)
    assert isinstance(teacher, Teacher)
    assert [teacher.momentum_at(k) for k in (1, 2, 3)] == pytest.approx(momentum_schedule(0.5, 1.0, 3))
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.module.parameters())
    w0 = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    teacher.update(student, step=1)  # momentum 0.5
    assert torch.allclose(teacher.module[0].weight, w0 + 0.5)
    teacher.update(student, step=3)  # momentum 1.0: frozen
    assert torch.allclose(teacher.module[0].weight, w0 + 0.5)
    clone = EMATeacher(_bn_net(9), 0.5)
    clone.load_state_dict(teacher.state_dict())
    x = {"x": torch.randn(4, 3)}
    assert torch.equal(clone(x).logits, teacher(x).logits) and clone.updates == 2


# ---- PS-KD -------------------------------------------------------------------------------------


def test_past_predictions_come_from_the_previous_epoch_and_follow_sample_ids():
    n, c = 6, 3
    teacher = PastPredictionsTeacher(num_ids=n, num_classes=c, alpha_T=0.8, steps_per_epoch=2, total_epochs=4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.Generator().manual_seed(0)
    seen_logits = {}  # epoch -> [n, c] student logits given to observe
    step = 0
    for epoch in range(3):
        perm = torch.randperm(n, generator=g)
        epoch_logits = torch.randn(n, c, generator=g)
        seen_logits[epoch] = epoch_logits
        for half in (perm[:3], perm[3:]):  # two shuffled batches per epoch
            batch = {"index": half, "y": y[half]}
            target = teacher(batch).logits.exp()
            alpha = 0.8 * (epoch + 1) / 4  # official PS-KD: alpha_T * (epoch + 1) / E, 0-based epochs
            onehot = torch.nn.functional.one_hot(y[half], c).float()
            if epoch == 0:
                want = onehot  # nothing seen yet
            else:
                past = torch.softmax(seen_logits[epoch - 1][half], -1).half().float()
                want = (1 - alpha) * onehot + alpha * past
            assert torch.allclose(target, want, atol=1e-6), (epoch, half)
            teacher.observe(batch, ModelOutput(logits=epoch_logits[half]))
            step += 1
            teacher.update(None, step)
    assert teacher.epoch == 3
    state = teacher.state_dict()
    fresh = PastPredictionsTeacher(n, c, 0.8, 2, 4)
    fresh.load_state_dict(state)
    batch = {"index": torch.tensor([4, 1]), "y": y[[4, 1]]}
    assert torch.equal(fresh(batch).logits, teacher(batch).logits)


def test_past_predictions_schedule_reaches_alpha_T_in_the_last_epoch_and_stops_there():
    """The official schedule (lgcnsai/PS-KD-Pytorch, main.py): alpha_t = alpha_T * (epoch + 1) / E."""
    teacher = PastPredictionsTeacher(1, 2, 0.8, 1, 4)  # one step per epoch, E = 4
    alphas = []
    for step in range(6):
        teacher.update(None, step)
        alphas.append(teacher.alpha)
    assert alphas == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8], abs=1e-12)
    teacher.update(None, 3)  # the bug report's example: epoch 3 of 4 is the last one
    assert teacher.epoch == 3 and teacher.alpha == pytest.approx(0.8, abs=1e-12)
    halves = PastPredictionsTeacher(1, 2, 0.5, 2.5, 3)  # fractional steps per epoch
    halves.update(None, 4)  # 4 / 2.5 = 1.6: epoch 1
    assert halves.epoch == 1 and halves.alpha == pytest.approx(0.5 * 2 / 3, abs=1e-12)


def test_past_predictions_in_epoch_0_are_the_one_hot_labels_although_alpha_is_positive():
    """Official PS-KD writes the one-hot labels into its table in epoch 0; unseen samples get them here."""
    teacher = PastPredictionsTeacher(3, 3, 0.8, 10, 4)
    assert teacher.alpha == pytest.approx(0.2)
    y = torch.tensor([2, 0, 1])
    target = teacher({"index": torch.arange(3), "y": y}).logits.exp()
    assert torch.equal(target, torch.nn.functional.one_hot(y, 3).float())


def test_past_predictions_refuse_unlabelled_rows():
    teacher = PastPredictionsTeacher(4, 2, 0.8, 1, 2)
    with pytest.raises(ValueError, match="needs a label on every training row"):
        teacher({"index": torch.tensor([0, 1]), "y": torch.tensor([1, -100])})


# ---- peers and exits read the student's own stacked output ------------------------------------


def test_peers_teacher_is_the_mean_of_the_other_peers_detached():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, requires_grad=True)  # K=3 peers
    out = PeersTeacher()({}, ModelOutput(logits=logits)).logits
    p = torch.softmax(logits.detach(), -1)
    for k in range(3):
        others = torch.stack([p[j] for j in range(3) if j != k]).mean(0)
        assert torch.allclose(out[k].exp(), others, atol=1e-6)
    assert not out.requires_grad


def test_deepest_exit_teacher_and_missing_student_output():
    logits = torch.randn(3, 2, 4)
    out = DeepestExitTeacher()({}, ModelOutput(logits=logits)).logits
    assert torch.equal(out, logits[-1:].expand(3, 2, 4))
    with pytest.raises(ValueError, match="stacked outputs"):
        DeepestExitTeacher()({"x": torch.zeros(2, 4)})


def test_peer_group_members_are_initialised_differently():
    group = PeerGroup(lambda: nn.Linear(4, 3), peers=3, seed=5)
    weights = [m.weight for m in group.members]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    with pytest.raises(ValueError, match="at least 2 peers"):
        PeerGroup(lambda: nn.Linear(4, 3), peers=1)


# ---- end to end through the runner --------------------------------------------------------------

TINY = ["seeds=[0]", "train.steps=12", "train.eval_every=6", "baseline.train.steps=12", "data.transfer=100"]
SOURCES = {
    "ema": ("{source: ema, momentum: 0.9}", "{ce: {}, forward_kl: {temperature: 2}}"),
    "random": ("{source: random}", "{ce: {}, forward_kl: {}}"),
    "past_predictions": ("{source: past_predictions}", "{forward_kl: {}}"),
    "snapshot": ("{source: snapshot, generations: 2}", "{kd: {alpha: 1.5, temperature: 1}}"),
    "peers": ("{source: peers, peers: 2}", "{ce: {}, forward_kl: {}}"),
    "exits": ("{source: exits, exits: {at: [body.2]}}", "{ce: {}, forward_kl: {}}"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_recipe_switches_the_teacher_source_by_name(source, tmp_path):
    from distillery.experiment import run

    teacher, loss = SOURCES[source]
    extra = ["data.transfer=0"] if source == "past_predictions" else []
    cfg = load_config(
        "digits-kd",
        [
            *TINY,
            *extra,
            f"teacher={teacher}",
            f"loss={loss}",
            "student.hidden=[16,16]",
            f"output.dir={tmp_path}",
        ],
    )
    result = run(cfg, progress=False)
    arms = list(result.arms)
    assert arms[0] == "baseline"
    assert result.summary["paired_vs_baseline"]  # every non-baseline arm is compared with CE
    for arm in arms:
        record = result.arms[arm][0]
        assert 0 <= record["metrics"]["accuracy"] <= 100
        if arm != "ensemble":  # saved students load into the plain student architecture
            plain = build_model(cfg.student, (1, 8, 8), 10)
            load_model(plain, str(tmp_path / "seed-0" / arm / "student.safetensors"))
    if source == "snapshot":
        assert arms == ["baseline", "gen-1", "gen-2", "ensemble"]
    if source == "exits":
        members = result.arms["distilled"][0]["members"]
        assert (
            list(members) == ["body.2", "final"] and members["body.2"]["params"] < members["final"]["params"]
        )
    assert (tmp_path / "report.md").read_text().count("paired accuracy difference".capitalize()) >= 1


def test_born_again_generation_learns_from_the_previous_generation(tmp_path, monkeypatch):
    import distillery.experiment.runner as runner

    teachers = {}
    real_fit = runner.fit

    def spy(model, train_set, objective, config, *, teacher=None, label="", **kw):
        teachers[label] = teacher
        return real_fit(model, train_set, objective, config, teacher=teacher, label=label, **kw)

    monkeypatch.setattr(runner, "fit", spy)
    cfg = load_config(
        "digits-kd",
        [
            *TINY,
            "teacher={source: snapshot, generations: 2}",
            "loss={kd: {alpha: 0.5}}",
            f"output.dir={tmp_path}",
        ],
    )
    runner.run(cfg, progress=False)
    x = {"x": torch.randn(7, 1, 8, 8)}

    def saved(arm):
        model = build_model(cfg.student, (1, 8, 8), 10)
        load_model(model, str(tmp_path / "seed-0" / arm / "student.safetensors"))
        return model.eval()(x["x"])

    assert teachers["seed 0 baseline"] is None
    gen1_teacher, gen2_teacher = teachers["seed 0 gen-1"](x).logits, teachers["seed 0 gen-2"](x).logits
    assert torch.allclose(gen1_teacher, saved("baseline"), atol=1e-6)  # generation 0 teaches generation 1
    assert torch.allclose(
        gen2_teacher, saved("gen-1"), atol=1e-6
    )  # generation 1 (not 0) teaches generation 2
    assert not torch.allclose(gen2_teacher, saved("baseline"), atol=1e-3)


def test_exits_are_removed_and_the_exported_student_matches_the_final_exit(tmp_path):
    from distillery.experiment import run
    from distillery.models.exits import MultiExit

    cfg = load_config(
        "digits-kd",
        [*TINY, "teacher={source: exits, exits: {at: [body.2]}}", "loss={ce: {}, forward_kl: {}}",
         "student.hidden=[16,16]", f"output.dir={tmp_path}"],
    )  # fmt: skip
    run(cfg, progress=False)
    arm = tmp_path / "seed-0" / "distilled"
    plain = build_model(cfg.student, (1, 8, 8), 10)
    load_model(plain, str(arm / "student.safetensors"))
    assert not any(m._forward_hooks for m in plain.modules())
    stacked_state = load_file(str(arm / "stacked.safetensors"))
    assert any(k.startswith("heads.") for k in stacked_state)  # the exit heads are kept beside it
    x = torch.randn(5, 1, 8, 8)
    multi = MultiExit(build_model(cfg.student, (1, 8, 8), 10), ["body.2"], example_input=x)
    multi.load_state_dict(stacked_state)
    multi.eval()
    assert torch.allclose(multi(x)[-1], plain.eval()(x), atol=1e-6)
    assert not any(m._forward_hooks for m in multi.modules())


def test_per_example_weights_follow_the_batch_axis_of_stacked_outputs():
    from distillery.models.adapters import StackedClassifierAdapter
    from distillery.train.loop import _row_weight

    adapter = StackedClassifierAdapter(members=2)  # M == B: the axes must not be confused
    batch = {"x": torch.zeros(2, 3), "y": torch.tensor([0, 1]), "row_weight": torch.tensor([0.25, 1.0])}
    _, mask = adapter.rows(batch)
    assert torch.equal(_row_weight(batch, mask, adapter), torch.tensor([[0.25, 1.0], [0.25, 1.0]]))
