import gzip
import struct

import pytest
import torch

from distillery.data import ImageDataConfig, corrupt_labels, load_classification_data, stratified_sample
from distillery.data.augment import AugmentConfig, augment_batch, random_shift
from distillery.data.fashion_mnist import FILES, read_idx
from distillery.errors import ConfigError, DataNotFoundError


def test_digits_splits_are_disjoint_balanced_and_paired_by_seed():
    cfg = ImageDataConfig(name="digits", labelled=200, transfer=970, test=497)  # validation: 10% of 1,300
    a = load_classification_data(cfg, 0)
    assert (len(a.labelled), len(a.transfer), len(a.validation), len(a.test)) == (200, 970, 130, 497)
    assert torch.equal(a.labelled.y.bincount(), torch.full((10,), 20))
    assert torch.equal(a.validation.y.bincount(), torch.full((10,), 13))
    ids = [set(part.index.tolist()) for part in (a.labelled, a.transfer, a.validation)]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 1300  # disjoint, and together the whole pool
    assert (a.transfer.y == -100).all() and (a.validation.y >= 0).all()
    again = load_classification_data(cfg, 0)
    assert torch.equal(a.labelled.index, again.labelled.index) and torch.equal(a.labelled.x, again.labelled.x)
    other = load_classification_data(cfg, 1)
    assert not torch.equal(a.labelled.index, other.labelled.index)
    assert torch.equal(a.test.x, other.test.x)  # the test split is fixed across seeds
    assert not torch.equal(a.validation.index, other.validation.index)  # drawn per seed
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.distillation_set()) == 1170
    counted = load_classification_data(ImageDataConfig(name="digits", validation=50, transfer=None), 0)
    assert (len(counted.validation), len(counted.labelled), len(counted.transfer)) == (50, 1250, 0)


def test_split_sizes_are_checked():
    with pytest.raises(
        ConfigError, match=r"data.labelled=200, data.transfer=1100 and the 130 validation examples"
    ):
        load_classification_data(ImageDataConfig(name="digits", labelled=200, transfer=1100), 0)
    with pytest.raises(
        ConfigError, match=r"data.labelled=1200 exceeds the 1170 examples .* left after the 130"
    ):
        load_classification_data(ImageDataConfig(name="digits", labelled=1200), 0)
    with pytest.raises(ConfigError, match="data.validation=1300 leaves no training examples"):
        load_classification_data(ImageDataConfig(name="digits", validation=1300), 0)
    with pytest.raises(ValueError, match="fraction of the training pool must be < 1"):
        ImageDataConfig(name="digits", validation=1.0)
    rest = load_classification_data(ImageDataConfig(name="digits", labelled=100, transfer=None), 0)
    assert len(rest.transfer) == 1300 - 130 - 100


def test_stratified_sample_handles_uneven_classes():
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    chosen = stratified_sample(labels, 12, torch.Generator().manual_seed(0))
    counts = labels[chosen].bincount().tolist()
    assert counts == [2, 5, 5] and len(set(chosen.tolist())) == 12


def test_random_shift_moves_pixels_within_bounds():
    x = torch.zeros(64, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 5, pos % 5
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(64))
    batch = {"x": x, "y": torch.zeros(64)}
    assert augment_batch(batch, AugmentConfig(), torch.Generator()) is batch


def _write_idx(path, array_bytes, dims):
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array_bytes)


def _fake_fashion(root, n_train=40, n_test=20):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        _write_idx(root / FILES[f"{split}_images"], images.numpy().tobytes(), [n, 28, 28])
        _write_idx(root / FILES[f"{split}_labels"], labels.numpy().tobytes(), [n])


def test_fashion_mnist_reads_idx_files_from_distillery_data(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path))
    data = load_classification_data(
        ImageDataConfig(name="fashion_mnist", labelled=20, transfer=None, download=False), 0
    )
    assert (len(data.labelled), len(data.transfer), len(data.validation), len(data.test)) == (20, 16, 4, 20)
    assert data.input_shape == (1, 28, 28) and 0.0 <= data.labelled.x.min() and data.labelled.x.max() <= 1.0
    assert data.class_names[0] == "t-shirt/top"


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("distillery.data.fashion_mnist.SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as info:
        load_classification_data(ImageDataConfig(name="fashion_mnist", download=False), 0)
    msg = str(info.value)
    assert (
        "apt-get install dataset-fashion-mnist" in msg
        and "DISTILLERY_DATA" in msg
        and str(tmp_path / "empty") in msg
    )


def test_corrupt_idx_file_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, b"\x00" * 10, [3, 4])
    with pytest.raises(DataNotFoundError, match="truncated or corrupt"):
        read_idx(path)


@pytest.mark.parametrize("kind", ["symmetric", "flip"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_label_noise_rate_is_exact_and_reproducible(kind, rate):
    y = torch.arange(1000) % 10
    noisy = corrupt_labels(y, 10, rate, kind, torch.Generator().manual_seed(3))
    wrong = noisy != y
    assert int(wrong.sum()) == round(rate * 1000)
    assert noisy.min() >= 0 and noisy.max() < 10
    if kind == "flip":
        assert torch.equal(noisy[wrong], (y[wrong] + 1) % 10)
    else:  # every other class is used as a wrong label
        if rate > 0:
            pairs = {(int(a), int(b)) for a, b in zip(y[wrong], noisy[wrong])}
            assert len({b - a for a, b in pairs}) > 5
    again = corrupt_labels(y, 10, rate, kind, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)


def test_label_noise_in_a_run_keeps_clean_labels_and_test_split():
    clean_cfg = ImageDataConfig(name="digits", labelled=300, transfer=0)
    noisy_cfg = ImageDataConfig(name="digits", labelled=300, transfer=0, label_noise={"rate": 0.4})
    clean, noisy = load_classification_data(clean_cfg, seed=1), load_classification_data(noisy_cfg, seed=1)
    assert torch.equal(clean.labelled.x, noisy.labelled.x)  # same examples, paired with the clean run
    assert torch.equal(noisy.clean_labels, clean.labelled.y)
    assert int((noisy.labelled.y != clean.labelled.y).sum()) == 120
    assert torch.equal(noisy.test.y, clean.test.y)  # evaluation stays clean
    assert "40% of them with wrong labels" in noisy.describe()
    other_seed = load_classification_data(noisy_cfg, seed=2)
    assert not torch.equal(
        other_seed.labelled.y - other_seed.clean_labels, noisy.labelled.y - noisy.clean_labels
    )


def test_label_noise_changes_the_teacher_cache_key():
    from distillery.config import load_config
    from distillery.tasks.classification import teacher_cache_key

    clean = load_config("digits-kd")
    noisy = load_config("digits-kd", ["data.label_noise.rate=0.2"])
    zero = load_config("digits-kd", ["data.label_noise.rate=0.0"])
    assert teacher_cache_key(clean, 0) != teacher_cache_key(noisy, 0)
    assert teacher_cache_key(clean, 0) == teacher_cache_key(zero, 0)


def test_a_csv_reads_text_fields_as_written_and_other_columns_as_numbers(tmp_path, monkeypatch):
    from distillery.data.tables import TableSource, load_table

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.csv"
    path.write_text("text,label,score\n007,1,0.5\n1e3,2,1.5\n")
    table = load_table(TableSource(path=str(path)), "data.train", ["text", "label"], text=["text"])
    assert table["text"] == ["007", "1e3"]  # not 7 and 1000.0
    assert table["label"] == [1, 2] and table["score"] == [0.5, 1.5]
    guessed = load_table(TableSource(path=str(path)), "data.train", ["text"])
    assert guessed["text"] != ["007", "1e3"]  # without text=, pandas guesses types: why text= exists
