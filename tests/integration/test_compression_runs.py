"""The compression recipes end to end through the command line, reduced: an int8 QAT student and a
pruned student, each trained with CE and with KD, saved, reported and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.cli import main
from distillery.data.fashion_mnist import find_files

# Fashion-MNIST recipes on digits-sized data, in seconds (the recipes' own data needs the Debian package)
DIGITS = ["data={name: digits, validation: 50, labelled: 600, transfer: 0, test: 200}",
          "teacher.model={name: cnn, channels: [16], dropout: 0}", "teacher.train.steps=150",
          "student={name: cnn, channels: [8, 16], pool_every: 1, dropout: 0}",
          "train.steps=300", "train.eval_every=150", "train.batch_size=32", "seeds=[0]", "--no-progress"]  # fmt: skip
FASHION = ["data.labelled=600", "data.validation=100", "data.test=300", "teacher.train.steps=20",
           "train.steps=20", "train.eval_every=10", "seeds=[0]", "--no-progress"]  # fmt: skip


def run(args: list[str], tmp_path: Path, capsys) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of quantized tensors
def test_qat_recipe_trains_int8_students_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "qat"
    code, out = run(["fashion-mnist-qat-kd", f"output.dir={out_dir}", *DIGITS], tmp_path, capsys)
    assert code == 0, out
    assert out.count("int8 (x86):") == 2  # both arms, CE and KD, compressed
    for arm in ("baseline", "distilled"):
        record = json.loads((out_dir / "seed-0" / arm / "result.json").read_text())
        c = record["compression"]
        assert c["method"] == "qat" and c["int8_bytes"] > 0 and c["float_latency_ms"] > 0
        state = torch.load(out_dir / "seed-0" / arm / "student-int8.pt", weights_only=True)
        assert state["head._packed_params._packed_params"][0].dtype == torch.qint8
        plain = load_file(str(out_dir / "seed-0" / arm / "student.safetensors"))
        assert not any("fake_quant" in k or "activation_post_process" in k for k in plain)  # the plain CNN
    code, out = run(["fashion-mnist-qat-kd", f"output.dir={out_dir}", *DIGITS, "--resume"], tmp_path, capsys)
    assert code == 0 and out.count("already complete") == 2, out


@pytest.mark.integration
def test_prune_recipe_reaches_its_sparsity_in_both_arms(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "prune"
    args = ["fashion-mnist-prune-kd", f"output.dir={out_dir}", *DIGITS, "compress.every=10"]
    code, out = run(args, tmp_path, capsys)
    assert code == 0, out
    for arm in ("baseline", "distilled"):
        record = json.loads((out_dir / "seed-0" / arm / "result.json").read_text())
        assert record["compression"]["sparsity"] == pytest.approx(0.8, abs=0.02)
        weights = load_file(str(out_dir / "seed-0" / arm / "student.safetensors"))
        w = torch.cat([v.reshape(-1) for k, v in weights.items() if k.endswith("weight")])
        assert (w == 0).float().mean() == pytest.approx(0.8, abs=0.02)
        assert record["metrics"]["accuracy"] > 20.0  # trained, not destroyed (10 classes: chance is 10%)


@pytest.mark.integration
@pytest.mark.skipif(
    find_files() is None, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
@pytest.mark.parametrize("recipe", ["fashion-mnist-qat-kd", "fashion-mnist-prune-kd"])
def test_fashion_mnist_compression_recipes_run_reduced(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    code, out = run([recipe, f"output.dir={tmp_path / 'run'}", *FASHION], tmp_path, capsys)
    assert code == 0, out
    record = json.loads((tmp_path / "run" / "seed-0" / "distilled" / "result.json").read_text())
    assert record["compression"]["method"] == recipe.split("-")[2]
