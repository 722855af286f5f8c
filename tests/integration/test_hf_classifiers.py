"""Hugging Face classifiers from YAML: ``model: {pretrained: <dir>}`` as the teacher or the student of a
classification run, on tiny models saved locally with ``save_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.cli import main
from distillery.config import load_config
from distillery.data import ImageDataConfig, load_classification_data

QUICK = ["seeds=[0]", "train.steps=6", "train.eval_every=3", "--no-progress"]


def _tiny_vit(path, num_labels=10, channels=1):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_labels)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


def test_a_pretrained_teacher_is_loaded_as_it_is(vit, tmp_path):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    args = ["digits-kd", *QUICK, f"teacher={{model: {{pretrained: {vit}}}}}", f"output.dir={out}"]
    assert main(["run", *args]) == 0
    info = json.loads((out / "seed-0" / "teacher.json").read_text())
    assert info["source"] == str(vit) and info["cached"] is False and info["seconds"] == 0.0
    hf = AutoModelForImageClassification.from_pretrained(vit).eval()
    test = load_classification_data(
        ImageDataConfig(name="digits", labelled=200, transfer=970, test=497), 0
    ).test
    with torch.no_grad():
        logits = hf(pixel_values=test.x).logits
    accuracy = float((logits.argmax(-1) == test.y).float().mean()) * 100
    assert info["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert info["params"] == sum(p.numel() for p in hf.parameters())


def test_a_pretrained_student_is_fine_tuned_and_saved_for_transformers(vit, tmp_path):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    args = ["digits-kd", *QUICK, "teacher.train.steps=10", "teacher.ensemble=1", f"student={{pretrained: {vit}}}",
            f"output.dir={out}"]  # fmt: skip
    assert main(["run", *args]) == 0
    cfg = load_config("digits-kd", [a for a in args[1:] if a != "--no-progress"])
    assert cfg.student.name == "pretrained" and cfg.student.pretrained == str(vit)
    before = AutoModelForImageClassification.from_pretrained(vit).eval()
    x = torch.rand(5, 1, 8, 8)
    for arm in ("baseline", "distilled"):
        saved = AutoModelForImageClassification.from_pretrained(out / "seed-0" / arm / "model").eval()
        with torch.no_grad():
            assert not torch.allclose(saved(pixel_values=x).logits, before(pixel_values=x).logits)  # trained
    from distillery.experiment import evaluate_run

    summary = json.loads((out / "summary.json").read_text())
    again = evaluate_run(out).summary  # student.safetensors back into the wrapped architecture
    for arm in ("baseline", "distilled"):
        assert again["models"][arm]["accuracy"]["mean"] == pytest.approx(
            summary["models"][arm]["accuracy"]["mean"]
        )


def test_labels_and_kinds_that_do_not_fit_the_data_are_user_errors(tmp_path, capsys):
    five = _tiny_vit(tmp_path / "five-labels", num_labels=5)
    assert main(["run", "digits-kd", *QUICK, f"teacher={{model: {{pretrained: {five}}}}}"]) == 2
    assert "predicts 5 classes, the data has 10; set new_head: true" in capsys.readouterr().err
    out = tmp_path / "run"
    args = [
        *QUICK,
        "teacher.train.steps=10",
        "teacher.ensemble=1",
        f"student={{pretrained: {five}, new_head: true}}",
    ]
    assert main(["run", "digits-kd", *args, f"output.dir={out}"]) == 0  # a new 10-class head
    rgb = _tiny_vit(tmp_path / "rgb", channels=3)
    assert main(["run", "digits-kd", *QUICK, f"teacher={{model: {{pretrained: {rgb}}}}}"]) == 2
    assert "takes 3-channel images, the data has 1 channel(s)" in capsys.readouterr().err

    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=10)).save_pretrained(bert)  # fmt: skip
    assert main(["run", "digits-kd", *QUICK, f"teacher={{model: {{pretrained: {bert}}}}}"]) == 2
    assert "is a sequence (text) classifier, but this run's data are images" in capsys.readouterr().err
    assert (
        main(["run", "digits-kd", *QUICK, f"teacher={{model: {{pretrained: {tmp_path / 'missing'}}}}}"]) == 2
    )
    assert "no model config found there" in capsys.readouterr().err
