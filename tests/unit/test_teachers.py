import json

import pytest
import torch
from torch import nn

from distillery.data import ArrayDataset
from distillery.teachers import BaseTeacher, CachedTeacher, FrozenTeacher, Teacher, TeacherStore, config_hash


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_every_teacher_satisfies_the_protocol():
    data = ArrayDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.arange(5))
    frozen = FrozenTeacher(_net())
    for teacher in (frozen, CachedTeacher.precompute(frozen, data)):
        assert isinstance(teacher, Teacher)
        out = teacher(data.get_batch(torch.tensor([0, 3])))
        assert out.logits.shape == (2, 3) and out.logits.dtype == torch.float32
        teacher.update(nn.Linear(1, 1), step=1)  # stateless teachers accept and ignore updates
        assert teacher.state_dict() == {}


def test_frozen_teacher_is_eval_no_grad_float32():
    net = _net().double()
    net.train()
    teacher = FrozenTeacher(net)
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    x = {"x": torch.randn(6, 4)}
    a, b = teacher(x).logits, teacher(x).logits
    assert torch.equal(a, b)  # dropout is off
    assert a.dtype == torch.float32 and not a.requires_grad
    net.train()  # user code flips it back: the teacher still runs in eval mode
    assert torch.equal(teacher(x).logits, a)


def test_cached_teacher_looks_up_by_sample_id_and_rejects_unknown_ids():
    logits = torch.randn(3, 2)
    teacher = CachedTeacher(logits, torch.tensor([10, 4, 7]))
    out = teacher({"index": torch.tensor([7, 10])})
    assert torch.equal(out.logits, logits[[2, 0]])
    with pytest.raises(KeyError, match="no cached teacher outputs for sample ids"):
        teacher({"index": torch.tensor([5])})
    with pytest.raises(KeyError):
        teacher({"index": torch.tensor([42])})


def test_from_checkpoint_loads_safetensors(tmp_path):
    from safetensors.torch import save_model

    net = _net()
    save_model(net, str(tmp_path / "t.safetensors"))
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    teacher = FrozenTeacher.from_checkpoint(tmp_path / "t.safetensors", fresh)
    x = {"x": torch.randn(2, 4)}
    assert torch.equal(teacher(x).logits, FrozenTeacher(net)(x).logits)
    with pytest.raises(FileNotFoundError):
        FrozenTeacher.from_checkpoint(tmp_path / "missing.safetensors", fresh)


def test_from_pretrained_loads_a_local_hugging_face_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    teacher = FrozenTeacher.from_pretrained(str(tmp_path), task="sequence-classification")
    batch = {
        "input_ids": torch.randint(0, 50, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "labels": torch.tensor([0, 2]),
    }
    out = teacher(batch)
    assert out.logits.shape == (2, 3) and not teacher.module.training
    with pytest.raises(ValueError, match="unknown task"):
        FrozenTeacher.from_pretrained(str(tmp_path), task="translation")


def test_store_round_trip_and_hash_stability(tmp_path):
    store = TeacherStore(tmp_path)
    key = config_hash({"a": 1, "b": [1, 2]})
    assert key == config_hash({"b": [1, 2], "a": 1}) and key != config_hash({"a": 2, "b": [1, 2]})
    assert not store.has(key)
    net = _net()
    store.save(key, net, {"seed": 3})
    assert store.has(key) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    assert store.load(key, fresh) == {"seed": 3}
    assert torch.equal(fresh[0].weight, net[0].weight)
    assert json.loads((tmp_path / key / "meta.json").read_text())["seed"] == 3


def test_base_teacher_refuses_foreign_state():
    with pytest.raises(ValueError, match="no state"):
        BaseTeacher().load_state_dict({"x": 1})


def _package_copy(tmp_path):
    import shutil
    from pathlib import Path

    import distillery

    root = tmp_path / "distillery"
    shutil.copytree(Path(distillery.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_training_code_version_follows_code_not_comments_or_docstrings(tmp_path):
    from distillery.teachers import training_code_version

    root = _package_copy(tmp_path)
    base = training_code_version(root)
    assert base == training_code_version(_package_copy(tmp_path / "again"))  # deterministic
    loop = root / "train" / "loop.py"
    _edit(loop, '"""The training loop:', '"""The one training loop:')  # a docstring
    _edit(
        loop,
        "    acc = accelerator or make_accelerator(config.mixed_precision)",
        "    # a comment\n    acc = accelerator or make_accelerator(config.mixed_precision)",
    )
    _edit(root / "report" / "plots.py", "dpi=120", "dpi=100")  # output only
    assert training_code_version(root) == base
    _edit(
        loop,
        "    acc = accelerator or make_accelerator(config.mixed_precision)",
        "    acc = accelerator or make_accelerator(config.mixed_precision)\n    _ = 1",
    )
    assert training_code_version(root) != base  # the loop changed: cached teachers are stale
    edited = _package_copy(tmp_path / "models")
    _edit(edited / "models" / "mlp.py", "nn.ReLU()", "nn.GELU()")
    assert training_code_version(edited) != base


def test_teacher_keys_include_the_code_version_and_torch(monkeypatch):
    import torch

    import distillery.teachers.store as store

    payload = {"kind": "classifier-teacher", "seed": 0}
    key = store.teacher_key(payload)
    assert key == store.config_hash(
        {**payload, "torch": torch.__version__, "code": store.training_code_version()}
    )
    monkeypatch.setattr(store, "training_code_version", lambda: "another-version")
    assert store.teacher_key(payload) != key


def test_ema_teacher_with_batch_statistics_normalises_with_the_batch():
    """DINO's and BYOL's teachers run in training mode: batch norm uses the batch's statistics (the
    EMA of running statistics lags far behind at momenta near 1). The default uses running statistics."""
    import torch
    from torch import nn

    from distillery.models import ClassifierAdapter
    from distillery.teachers.ema import EMATeacher

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batch = {"x": torch.randn(16, 3) * 5 + 2, "y": torch.zeros(16, dtype=torch.long)}
    running = EMATeacher(net, 0.99, adapter=ClassifierAdapter())(batch).logits
    batchwise = EMATeacher(net, 0.99, adapter=ClassifierAdapter(), batch_statistics=True)(batch).logits
    torch.testing.assert_close(batchwise.mean(0), torch.zeros(4), atol=1e-5, rtol=0)  # normalised per batch
    assert running.mean(0).abs().max() > 0.1  # running stats at their initial values: not normalised
