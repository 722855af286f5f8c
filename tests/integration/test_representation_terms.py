"""Representation terms in classification runs: signals read by module path, projectors built from
the shapes of an example batch, trained with the student and never exported; the errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distillery import functional as DF
from distillery.cli import main
from distillery.errors import ConfigError
from distillery.losses import LossInputs, build_objective
from distillery.losses.representation import FeaturesConfig, RKDDistanceConfig
from distillery.models import count_parameters
from distillery.models.adapters import ClassifierAdapter
from distillery.models.features import FeatureTap, TapAdapter, build_projector, signal_shapes

RUN = [
    "run", "digits-kd", "seeds=[0]", "teacher.ensemble=1", "teacher.train.steps=20", "train.steps=6",
    "baseline.train.steps=6", "train.eval_every=3", "student={name: cnn, channels: [8, 16, 16]}", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))


@pytest.mark.integration
def test_a_features_term_trains_a_projector_that_is_not_exported(tmp_path, capsys):
    out = tmp_path / "run"
    term = "loss.features={student: body.3, teacher: body.3, weight: 1.0}"  # 16 -> 48 channels, 8 x 8
    assert main([*RUN, term, f"output.dir={out}"]) == 0
    log = capsys.readouterr().out
    assert (
        "projector features.0: conv1x1 16 -> 48 (768 parameters) (trained with the student, not exported)"
        in log
    )
    arm = out / "seed-0" / "distilled"
    record = json.loads((arm / "result.json").read_text())
    assert record["projectors"] == {"features.0": "conv1x1 16 -> 48 (768 parameters)"}
    saved = load_file(str(arm / "student.safetensors"))
    baseline = load_file(str(out / "seed-0" / "baseline" / "student.safetensors"))
    assert set(saved) == set(baseline)  # the plain student: no projector, no wrapper prefix
    assert record["params"] == sum(t.numel() for t in baseline.values())
    assert any(not torch.equal(saved[k], baseline[k]) for k in saved)


@pytest.mark.integration
@pytest.mark.parametrize(
    "term",
    [
        "loss.attention_transfer={student: [body.3, body.6], teacher: [body.3, body.6], weight: 500}",
        "loss.rkd_distance={student: body.8, teacher: body.8, weight: 25}",
        "loss.rkd_angle={student: body.8, teacher: body.8, weight: 50}",
        "loss.sp={student: body.6, teacher: body.6, weight: 100}",
        "loss.cka={student: body.8, teacher: body.8}",
        "loss.features={student: body.8, teacher: body.8, kind: cosine, projector: mlp}",
    ],
)
def test_every_representation_term_runs_in_a_classification_run(tmp_path, term):
    out = tmp_path / "run"
    assert main([*RUN, term, f"output.dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    label = term.split("=", 1)[0].removeprefix("loss.")
    assert label in summary["method"]["loss"]
    history = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())["history"]
    assert history  # evaluated during training, on the validation split


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.features={student: body.33, teacher: body.3}"],
            "loss.features.student: no module at path 'body.33'",
        ),
        (["loss.features={student: body.3, teacher: bdy.3}"], "Did you mean: body.3"),
        (
            ["loss.features={student: body.3, teacher: body.3, projector: none}"],
            "student signal has shape [2, 16, 8, 8] and the teacher's [2, 48, 8, 8]",
        ),
        (
            ["loss.features={student: body.8, teacher: body.3, projector: conv1x1}"],
            "projector conv1x1 maps [B, C, H, W] maps of the same H x W",
        ),
        (
            ["loss.attention_transfer={student: body.3, teacher: body.6}"],
            "maps of the same H x W, but the student signal 'body.3' has shape [2, 16, 8, 8]",
        ),
        (
            ["loss.features={student: [body.3, body.6], teacher: body.3}"],
            "student names 2 signal(s) and teacher 1",
        ),
        (["teacher.ensemble=2", "loss.features={student: body.3, teacher: body.3}"], "teacher.ensemble=2"),
        (
            ["teacher.precompute=true", "loss.sp={student: body.3, teacher: body.3}"],
            "teacher.precompute=true",
        ),
    ],
)
def test_bad_signal_settings_are_user_errors_and_write_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main([*RUN, *overrides, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_signal_terms_refuse_a_teacher_source_without_a_network(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "digits-self",
                "loss.sp={student: body.1, teacher: body.1}",
                f"output.dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    assert "use teacher.source=frozen" in capsys.readouterr().err


# ---- the pieces -------------------------------------------------------------------------------------


def _nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    teacher = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    return student, teacher


def test_a_tapped_student_learns_through_its_projector_and_the_teacher_side_gets_no_gradient():
    student, teacher = _nets()
    shapes_s, shapes_t = (
        signal_shapes(student, ["1"], torch.zeros(2, 5)),
        signal_shapes(teacher, ["1"], torch.zeros(2, 5)),
    )
    proj = build_projector("auto", shapes_s["1"], shapes_t["1"], "loss.features")
    assert isinstance(proj, nn.Sequential) and proj[0].in_features == 6 and proj[0].out_features == 12
    tap_s, tap_t = (
        FeatureTap(student, {"features.0": "1"}, {"features.0": proj}),
        FeatureTap(teacher, {"features.0": "1"}),
    )
    adapter = TapAdapter(ClassifierAdapter())
    batch = {"x": torch.randn(4, 5), "y": torch.tensor([0, 1, -100, 2])}
    s_out = adapter.forward(tap_s, batch)
    with torch.no_grad():
        t_out = adapter.forward(tap_t, batch)
    objective = build_objective({"features": FeaturesConfig(student="1", teacher="1")})
    target, mask = adapter.rows(batch)
    inputs = LossInputs(s_out.logits, target, mask, t_out.logits, s_out.features, t_out.features)
    loss = objective(inputs)["features"]
    loss.backward()
    assert proj[0].weight.grad.abs().sum() > 0 and student[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert count_parameters(tap_s.model) == count_parameters(student)  # what is exported
    assert tap_s.take_features() == {}  # the adapter took them


def test_a_row_term_split_over_micro_batches_equals_the_whole_batch():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    target, mask = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool)
    objective = build_objective({"features": FeaturesConfig(student="a", teacher="b")})

    def part(rows):
        feats_s, feats_t = {"features.0": s[rows]}, {"features.0": t[rows]}
        inputs = LossInputs(None, target[rows], mask[rows], None, feats_s, feats_t)
        return objective(inputs, torch.tensor([6.0], dtype=torch.float64))["features"]

    whole = objective(LossInputs(None, target, mask, None, {"features.0": s}, {"features.0": t}))["features"]
    assert (part(slice(0, 2)) + part(slice(2, 6))).item() == pytest.approx(whole.item(), rel=1e-12)
    assert whole.item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-12)


def test_a_relation_term_without_its_signals_says_what_reads_them():
    objective = build_objective({"rkd": RKDDistanceConfig(student="a", teacher="b")})
    inputs = LossInputs(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs signal pair 0 \\(rkd.0\\) from the student and the teacher"):
        objective(inputs)


def test_projector_kinds_and_their_errors():
    assert build_projector("auto", (2, 8), (2, 8), "x") is None
    assert isinstance(build_projector("auto", (2, 4, 3, 3), (2, 8, 3, 3), "x"), nn.Conv2d)
    flat = build_projector("auto", (2, 4, 3, 3), (2, 8, 2, 2), "x")  # other spatial size: flattened linear
    assert flat(torch.zeros(2, 4, 3, 3)).shape == (2, 8, 2, 2)
    mlp = build_projector("mlp", (2, 5), (2, 7), "x")
    assert mlp(torch.zeros(3, 5)).shape == (3, 7) and len(mlp) == 3
    with pytest.raises(ConfigError, match=r"shape \[2, 5\] and the teacher's \[2, 7\]"):
        build_projector("none", (2, 5), (2, 7), "loss.features")


@pytest.mark.parametrize(
    ("name", "function", "shape_s", "shape_t", "extra"),
    [
        ("features", lambda s, t: DF.feature_distance(s.flatten(1), t.flatten(1)), (5, 4), (5, 4), {}),
        ("attention_transfer", lambda s, t: DF.attention_transfer(s, t, p=2), (5, 3, 4, 4), (5, 6, 4, 4), {}),
        ("rkd_distance", DF.rkd_distance, (6, 3), (6, 5), {}),
        ("rkd_angle", DF.rkd_angle, (6, 3), (6, 5), {}),
        ("sp", lambda s, t: DF.similarity_preserving(s, t), (5, 2, 3), (5, 7), {}),
        ("cka", lambda s, t: DF.linear_cka_loss(s, t), (6, 3), (6, 5), {}),
    ],
)
def test_each_sample_level_term_is_its_function_on_the_valid_rows(name, function, shape_s, shape_t, extra):
    from distillery.losses import LOSSES

    g = torch.Generator().manual_seed(3)
    s = torch.randn(*shape_s, generator=g, dtype=torch.float64)
    t = torch.randn(*shape_t, generator=g, dtype=torch.float64)
    cfg = LOSSES[name][0](student="a", teacher="b", **extra)
    objective = build_objective({name: cfg})
    n = shape_s[0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[-1] = False  # a row that does not exist (padding): left out of every relation
    inputs = LossInputs(
        None, torch.zeros(n, dtype=torch.long), mask, None, {f"{name}.0": s}, {f"{name}.0": t}
    )
    want = function(s[:-1].flatten(1) if name in ("sp",) else s[:-1], t[:-1])
    assert objective(inputs)[name].item() == pytest.approx(want.item(), rel=1e-10)


def test_token_terms_pass_the_token_mask_and_relation_heads():
    g = torch.Generator().manual_seed(4)
    b, length = 3, 5
    tokens = torch.ones(b, length, dtype=torch.bool)
    tokens[0, 3:] = False
    rows = torch.ones(b, dtype=torch.bool)
    q_s, q_t = torch.randn(b, length, 8, generator=g), torch.randn(b, length, 12, generator=g)
    att_s = torch.randn(b, 2, length, length, generator=g).softmax(-1)
    att_t = torch.randn(b, 2, length, length, generator=g).softmax(-1)
    from distillery.losses import LOSSES

    cases = [
        (
            "relation_kl",
            {"heads": 4},
            q_s,
            q_t,
            DF.self_relation_kl(q_s, q_t, num_relation_heads=4, mask=tokens),
        ),
        ("attention_kl", {}, att_s, att_t, DF.attention_kl(att_s, att_t, mask=tokens)),
        ("attention_scores", {}, att_s, att_t, DF.attention_score_mse(att_s, att_t, mask=tokens)),
        ("features", {}, q_s, q_s.flip(0), DF.feature_distance(q_s, q_s.flip(0), mask=tokens)),
    ]
    for name, extra, s, t, want in cases:
        objective = build_objective({name: LOSSES[name][0](student="a", teacher="b", **extra)})
        feats = {f"{name}.0": s, "token_mask": tokens}
        inputs = LossInputs(None, torch.zeros(b, dtype=torch.long), rows, None, feats, {f"{name}.0": t})
        assert objective(inputs)[name].item() == pytest.approx(want.item(), rel=1e-6), name


def test_hidden_states_of_hugging_face_layers_are_read_by_path_and_projected_token_by_token():
    from transformers import BertConfig, BertForSequenceClassification

    def bert(hidden, layers):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, num_labels=3)  # fmt: skip
        return BertForSequenceClassification(config)

    student, teacher = bert(8, 1), bert(16, 2)
    ids = torch.randint(0, 40, (3, 5))
    s = signal_shapes(student, ["bert.encoder.layer.0"], ids)["bert.encoder.layer.0"]
    t = signal_shapes(teacher, ["bert.encoder.layer.1"], ids)["bert.encoder.layer.1"]
    assert s == (3, 5, 8) and t == (3, 5, 16)  # a layer's tuple output: its hidden states
    proj = build_projector("auto", s, t, "loss.features")
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (8, 16)
    tap = FeatureTap(student, {"features.0": "bert.encoder.layer.0"}, {"features.0": proj})
    tap(ids)
    assert tap.take_features()["features.0"].shape == (3, 5, 16)


def test_a_language_model_run_refuses_representation_terms(tmp_path, capsys):
    assert main(["run", "lm-kd", "loss.sp={student: a, teacher: b}", f"output.dir={tmp_path / 'r'}"]) == 2
    assert "loss.sp (sp) is a representation term" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
