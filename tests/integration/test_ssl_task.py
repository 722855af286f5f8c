"""The self-supervised task end to end on digits: CLI runs of DINO with a CNN and a ViT backbone, the
untrained baseline arm, the probes, the collapse signs during training, saved backbones, resume, and
the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distillery.cli import main


def _config(tmp_path: Path, **changes) -> Path:
    cfg = {
        "task": "ssl",
        "name": "ssl-test",
        "seeds": [0],
        "data": {"name": "digits"},
        "views": {"global_crops": 2, "local_crops": 2, "local_size": 4, "blur_sigma": [0.1, 1.0]},
        "model": {"backbone": {"name": "cnn", "channels": [8, 16]},
                  "head": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}},
        "train": {"steps": 8, "batch_size": 32, "eval_every": 4, "optimizer": {"name": "adamw", "lr": 0.001}},
        "eval": {"validation_bank": 200},
        "baseline": {"enabled": True},
    }  # fmt: skip
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.integration
def test_a_dino_run_trains_probes_and_reports(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path)), f"output.dir={out}", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "ssl" and summary["headline"] == "knn"
    for arm in ("baseline", "distilled"):
        for key in ("knn", "probe", "knn_few", "probe_few"):
            value = summary["models"][arm][key]["mean"]
            assert 0 <= value <= 100, (arm, key)
    # a random CNN already separates digits well above chance (10%): the probes measure something
    assert summary["models"]["baseline"]["probe"]["mean"] > 50
    base = json.loads((out / "seed-0" / "baseline" / "result.json").read_text())
    dist = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    assert base["steps"] == 0 and dist["steps"] == 8
    assert [h["step"] for h in dist["history"]] == [4, 8]
    for h in dist["history"]:
        assert 0 <= h["teacher_entropy"] <= 1 + 1e-6 and 0 <= h["teacher_mean_entropy"] <= 1 + 1e-6
        assert h["teacher_mean_entropy"] >= h["teacher_entropy"] - 1e-6  # the mean is never less spread
        assert h["embedding_std"] > 0 and "knn" in h
    # training moved the student away from its initial weights
    from safetensors.torch import load_file

    w0 = load_file(out / "seed-0" / "baseline" / "student.safetensors")
    w1 = load_file(out / "seed-0" / "distilled" / "student.safetensors")
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.integration
def test_the_last_layer_stays_frozen_for_its_epochs(tmp_path):
    """freeze_last_layer_epochs covering the whole run: the prototypes (the weight-normalised last layer)
    end where they started, while the rest of the network trained."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    head = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "freeze_last_layer_epochs": 5.0}
    changes = {"model": {"backbone": {"name": "cnn", "channels": [8, 16]}, "head": head}}
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0

    def prototypes(state):
        g = state["head.last_layer.parametrizations.weight.original0"]
        v = state["head.last_layer.parametrizations.weight.original1"]
        return g * v / v.norm(dim=1, keepdim=True)

    w0 = load_file(out / "seed-0" / "baseline" / "student.safetensors")
    w1 = load_file(out / "seed-0" / "distilled" / "student.safetensors")
    torch.testing.assert_close(prototypes(w1), prototypes(w0))
    assert not torch.equal(w0["head.mlp.0.weight"], w1["head.mlp.0.weight"])


@pytest.mark.integration
def test_a_vit_backbone_with_masks_saves_a_folder_transformers_loads(tmp_path):
    from transformers import ViTModel

    out = tmp_path / "run"
    changes = {
        "model": {"backbone": {"name": "vit", "patch_size": 2, "depth": 2, "width": 16, "heads": 2},
                  "head": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}},
        "views": {"global_crops": 2, "local_crops": 0, "mask": "block", "patch_size": 2},
        "train": {"steps": 4, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.001}},
        "baseline": {"enabled": False},
    }  # fmt: skip
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0
    vit = ViTModel.from_pretrained(out / "seed-0" / "distilled" / "backbone", add_pooling_layer=False)
    assert vit.config.patch_size == 2 and vit.config.num_hidden_layers == 2
    assert vit(pixel_values=torch.rand(2, 1, 8, 8)).last_hidden_state.shape == (2, 17, 16)


@pytest.mark.integration
def test_an_interrupted_ssl_run_resumes_to_the_same_numbers(tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path)
    assert main(["run", str(cfg), f"output.dir={out}", "--no-progress"]) == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "seed-0" / "distilled" / "result.json").unlink()  # as if stopped before it finished
    assert main(["run", str(cfg), f"output.dir={out}", "--resume", "--no-progress"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["models"]["distilled"]["knn"] == first["models"]["distilled"]["knn"]


VIT = {"backbone": {"name": "vit", "patch_size": 2, "depth": 2, "width": 16, "heads": 2},
       "head": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}}  # fmt: skip
MASKED = {"global_crops": 2, "mask": "block", "patch_size": 2}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"views": {"global_crops": 0, "local_crops": 4}}, "local_crops=4 with global_crops=0"),
        ({"views": {"global_size": 16}}, "views.global_size=16 is larger than the 8x8 images"),
        ({"views": {"mask": "block", "patch_size": 3}}, "views.patch_size=3 does not divide the global crop side 8"),
        ({"views": {"mask_ratio": [0.2, 1.0]}}, "mask_ratio must satisfy 0 <= low <= high < 1"),
        ({"views": {"global_crops": 1}}, "no pair of different views"),
        ({"loss": {"dino": {"teacher_temperature": 0}}}, "loss.dino.teacher_temperature"),
        ({"teacher": {"momentum": 1.5}}, "teacher.momentum"),
        ({"loss": {"kd": {}}}, "loss.kd (kd) is not a self-supervised term"),
        ({"data": {"name": "digits", "transfer": 100}}, "data.transfer"),
        ({"model": {"backbone": {"name": "vit", "patch_size": 3}}}, "model.patch_size=3 does not divide"),
        ({"loss": {"byol": {}}}, "loss.byol needs BYOL's projector and predictor"),
        ({"loss": {"dino": {}, "byol": {}}}, "loss has byol and dino"),
        ({"model": {"head": {"kind": "mlp"}}}, "loss.dino compares distributions over prototypes"),
        ({"model": {"head": {"kind": "mlp", "freeze_last_layer_epochs": 1}, "predictor": {}}, "loss": {"byol": {}}},
         "freeze_last_layer_epochs freezes DINO's prototypes"),
        ({"loss": {"ibot": {}}, "views": {"mask": "block", "patch_size": 2}}, "loss.ibot learns from patch tokens"),
        ({"loss": {"ibot": {}}, "model": VIT}, "views.mask=none; set views.mask=block"),
        ({"loss": {"ibot": {}}, "model": VIT, "views": {"mask": "block", "patch_size": 4}},
         "views.patch_size=4 draws masks on another grid"),
        ({"loss": {"ibot": {}, "dino": {}}}, "loss has dino and ibot"),
        ({"loss": {"koleo": {}}}, "koleo only spreads"),
        ({"loss": {"data2vec": {"top_k": 3}}, "model": {**VIT, "head": {"kind": "linear"}},
          "views": {"global_crops": 2, "mask": "block", "patch_size": 2}}, "top_k=3 averages more blocks"),
        ({"loss": {"data2vec": {"top_k": 2}}, "model": VIT, "views": MASKED}, "set model.head.kind=linear"),
        ({"loss": {"data2vec": {"top_k": 2}}, "model": {**VIT, "head": {"kind": "linear"}},
          "views": {**MASKED, "local_crops": 2, "local_size": 4}}, "views.local_crops=2"),
        ({"model": {**VIT, "head": {"kind": "linear"}}, "views": MASKED},
         "loss.dino compares distributions over prototypes, but model.head.kind=linear"),
    ],
)  # fmt: skip
def test_bad_ssl_settings_are_user_errors_and_write_nothing(tmp_path, capsys, changes, message):
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err
    assert not out.exists()


HEALTHY = {
    "model": {"backbone": {"name": "cnn", "channels": [16, 32]},
              "head": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}},
    "train": {"steps": 60, "batch_size": 64, "eval_every": 60, "clip_grad_norm": 3.0,
              "optimizer": {"name": "adamw", "lr": 0.0005}, "schedule": {"warmup_ratio": 0.1}},
    "loss": {"dino": {"teacher_temperature": 0.02}},
    "baseline": {"enabled": False},
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(
    ("dino", "collapses"),
    [
        ({"teacher_temperature": 0.02}, False),
        ({"teacher_temperature": 0.1, "center_momentum": 1.0}, True),  # no sharpening, no centring
    ],
    ids=["centred-and-sharpened", "neither"],
)
def test_a_collapsing_run_says_so_and_a_healthy_one_does_not(tmp_path, capsys, dino, collapses):
    out = tmp_path / "run"
    cfg = _config(tmp_path, **{**HEALTHY, "loss": {"dino": dino}})
    assert main(["run", str(cfg), f"output.dir={out}", "--no-progress"]) == 0
    console = capsys.readouterr().out
    record = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    signs = record["history"][-1]
    information = signs["teacher_mean_entropy"] - signs["teacher_entropy"]
    if collapses:
        assert information < 0.02
        assert len(record["warnings"]) == 1 and "collapsed" in record["warnings"][0]
        assert summary["models"]["distilled"]["warnings"] == [f"seed 0: {record['warnings'][0]}"]
        assert "**Warning, self-distilled**: seed 0: collapsed" in report
        assert "warning" in console and "collapsed" in console
    else:
        assert information > 0.1  # the targets tell the images apart
        assert record["warnings"] == [] and "warnings" not in summary["models"]["distilled"]
        assert "Warning" not in report and "collapsed" not in console


@pytest.mark.integration
def test_the_digits_dino_recipe_runs_through_the_cli(tmp_path):
    out = tmp_path / "run"
    args = ["seeds=[0]", "train.steps=20", "train.eval_every=10", f"output.dir={out}", "--no-progress"]
    assert main(["run", "digits-dino", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"baseline", "distilled"} and summary["task"] == "ssl"


@pytest.mark.integration
def test_a_byol_run_trains_a_predictor_against_the_ema_projector(tmp_path):
    out = tmp_path / "run"
    changes = {
        "model": {"backbone": {"name": "cnn", "channels": [8, 16]}, "head": {"kind": "mlp", "out_dim": 16, "hidden_dim": 32},
                  "predictor": {"hidden_dim": 32}},
        "loss": {"byol": {}},
        "views": {"global_crops": 2, "local_crops": 0},
    }  # fmt: skip
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0
    dist = json.loads((out / "seed-0" / "distilled" / "result.json").read_text())
    assert dist["steps"] == 8 and 0 <= dist["metrics"]["knn"] <= 100
    assert "teacher_entropy" not in dist["history"][-1] and dist["history"][-1]["embedding_std"] > 0
    assert dist["warnings"] == []  # no targets' entropies to judge a collapse by
    from safetensors.torch import load_file

    weights = load_file(out / "seed-0" / "distilled" / "student.safetensors")
    assert any(k.startswith("predictor.") for k in weights)


@pytest.mark.integration
def test_a_random_teacher_run_learns_from_a_fixed_network_of_its_own_architecture(tmp_path):
    """teacher.source=random: the teacher is another initialisation (seed + init_seed_offset), never
    updated; the student still trains, and ends elsewhere than against the EMA teacher."""
    from safetensors.torch import load_file

    outs = {}
    for source in ("random", "ema"):
        out = tmp_path / source
        cfg = _config(tmp_path, teacher={"source": source}, baseline={"enabled": False})
        assert main(["run", str(cfg), f"output.dir={out}", "--no-progress"]) == 0
        outs[source] = load_file(out / "seed-0" / "distilled" / "student.safetensors")
        if source == "random":
            report = (out / "report.md").read_text()
            assert "a random, frozen teacher" in report
    assert any(not torch.equal(outs["random"][k], outs["ema"][k]) for k in outs["ema"])


def test_the_ema_teacher_at_momentum_one_never_moves():
    from torch import nn

    from distillery.teachers.ema import EMATeacher

    net = nn.Linear(3, 2)
    teacher = EMATeacher(net, 1.0)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    teacher.update(net, 1)
    assert all(torch.equal(before[k], v) for k, v in teacher.module.state_dict().items())


@pytest.mark.integration
def test_an_ibot_run_with_koleo_learns_from_masked_patches(tmp_path):
    """iBOT on a ViT: the [CLS] centre and the patch centre are both trained state, saved with the
    objective; KoLeo's part is logged; the student's mask token trained."""
    out = tmp_path / "run"
    changes = {
        "model": VIT,
        "views": {**MASKED, "local_crops": 2, "local_size": 4, "mask_probability": 1.0},
        "loss": {"ibot": {"teacher_temperature": 0.04}, "koleo": {"weight": 0.1}},
    }
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0
    arm = out / "seed-0" / "distilled"
    dist = json.loads((arm / "result.json").read_text())
    assert dist["steps"] == 8 and 0 <= dist["metrics"]["knn"] <= 100
    assert "teacher_entropy" in dist["history"][-1]  # iBOT's [CLS] targets are judged like DINO's
    lines = [json.loads(x) for x in (arm / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") == "train"]
    assert train and all("ibot" in x and "koleo" in x for x in train)
    from safetensors.torch import load_file

    w0 = load_file(out / "seed-0" / "baseline" / "student.safetensors")
    w1 = load_file(arm / "student.safetensors")
    mask_token = [k for k in w1 if k.endswith("mask_token")]
    assert mask_token and not torch.equal(w0[mask_token[0]], w1[mask_token[0]])
    assert (arm / "backbone" / "config.json").is_file()  # the ViT as a transformers folder


@pytest.mark.integration
def test_a_data2vec_run_regresses_the_teachers_blocks(tmp_path):
    out = tmp_path / "run"
    changes = {
        "model": {**VIT, "head": {"kind": "linear"}},
        "views": {**MASKED, "mask_ratio": [0.4, 0.6], "mask_probability": 1.0},
        "loss": {"data2vec": {"top_k": 2}},
    }
    assert main(["run", str(_config(tmp_path, **changes)), f"output.dir={out}", "--no-progress"]) == 0
    arm = out / "seed-0" / "distilled"
    lines = [json.loads(x) for x in (arm / "metrics.jsonl").read_text().splitlines()]
    losses = [x["data2vec"] for x in lines if x.get("split") == "train"]
    assert losses and all(v > 0 for v in losses)  # every image is masked: a positive regression loss
    dist = json.loads((arm / "result.json").read_text())
    assert dist["steps"] == 8 and "teacher_entropy" not in dist["history"][-1]


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["digits-ibot", "digits-data2vec", "digits-byol", "digits-random-teacher"])
def test_the_digits_ssl_recipes_run_through_the_cli(tmp_path, recipe):
    out = tmp_path / "run"
    args = ["seeds=[0]", "train.steps=6", "train.eval_every=3", f"output.dir={out}", "--no-progress"]
    assert main(["run", recipe, *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"baseline", "distilled"} and summary["task"] == "ssl"
