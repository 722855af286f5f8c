"""Datasets: local files first (the real download path is kept), splits, augmentations.

Image classification datasets are named in YAML from :data:`DATASETS`, an explicit table.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from distillery.configbase import StrictModel
from distillery.data.augment import AugmentConfig, augment_batch
from distillery.data.base import UNLABELLED, ArrayDataset, ClassificationData, stratified_sample
from distillery.data.noise import LabelNoiseConfig, corrupt_labels
from distillery.errors import ConfigError

DATASETS = ("digits", "fashion_mnist")


class ImageDataConfig(StrictModel):
    """An image classification dataset and how a run splits it.

    Each run seed draws its own labelled split (class-balanced) and transfer split from the training
    pool, so that runs are paired: every arm of a seed sees the same examples.
    """

    name: Literal["digits", "fashion_mnist"] = "digits"
    validation: int | float = Field(
        0.1,
        ge=0,
        description="labelled validation examples carved from the training pool for each run seed "
        "(class-balanced, clean labels), for evaluation during training: a fraction (< 1) of the pool or "
        "a count; 0 = none. The test split is evaluated once, at the end",
    )
    labelled: int | None = Field(
        None,
        ge=1,
        description="labelled training examples per run (class-balanced); null = the pool minus the validation split",
    )
    transfer: int | None = Field(
        0,
        ge=0,
        description="unlabelled transfer examples, drawn from the rest of the pool; null = all the rest",
    )
    test: int | None = Field(
        None,
        ge=1,
        description="held-out test examples (digits: split off the 1,797; default 497); "
        "Fashion-MNIST: a fixed subsample of the official 10,000 (null = all)",
    )
    split_seed: int = Field(0, description="seed of the fixed train/test split (independent of run seeds)")
    label_noise: LabelNoiseConfig | None = Field(
        None, description="corrupt a fraction of the labelled split's labels (test labels stay clean)"
    )
    root: str | None = Field(None, description="directory holding the dataset files (Fashion-MNIST)")
    download: bool = Field(True, description="download a missing dataset from its official source")

    @field_validator("validation")
    @classmethod
    def _fraction_below_one(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not value < 1.0:
            raise ValueError(f"a fraction of the training pool must be < 1 (or give a count); got {value}")
        return value

    def validation_count(self, pool: int) -> int:
        """How many of the ``pool`` training examples the validation split takes."""
        if isinstance(self.validation, float):
            return round(self.validation * pool)
        return self.validation


def _pool_and_test(cfg: ImageDataConfig):
    """Training pool and test set before per-seed splitting: ``(x_pool, y_pool, x_test, y_test, names)``."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    if cfg.name == "digits":
        from distillery.data.digits import load_digits_arrays

        x, y = load_digits_arrays()
        n_test = 497 if cfg.test is None else cfg.test
        if n_test >= len(y):
            raise ConfigError(f"data.test={n_test} leaves no training examples (digits has {len(y)})")
        test_pos = stratified_sample(y, n_test, g)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[test_pos] = False
        return x[keep], y[keep], x[test_pos], y[test_pos], tuple(str(i) for i in range(10))
    from distillery.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist_arrays

    x_train, y_train, x_test, y_test = load_fashion_mnist_arrays(cfg.root, cfg.download)
    if cfg.test is not None:
        if cfg.test > len(y_test):
            raise ConfigError(f"data.test={cfg.test} exceeds the {len(y_test)} Fashion-MNIST test images")
        pos = stratified_sample(y_test, cfg.test, g)
        x_test, y_test = x_test[pos], y_test[pos]
    return x_train, y_train, x_test, y_test, CLASS_NAMES


def load_classification_data(cfg: ImageDataConfig, seed: int) -> ClassificationData:
    """Load the dataset and draw the validation, labelled and transfer splits for run ``seed``.

    The validation split is drawn first (class-balanced), then the labelled split (class-balanced) and
    the transfer split from the rest of the training pool: the four splits are disjoint, and the test
    split is the same for every seed.
    """
    x_pool, y_pool, x_test, y_test, names = _pool_and_test(cfg)
    n_pool = len(y_pool)
    n_val = cfg.validation_count(n_pool)
    if n_val >= n_pool:
        raise ConfigError(
            f"data.validation={cfg.validation} leaves no training examples ({n_pool} in the pool)"
        )
    n_train = n_pool - n_val
    n_lab = n_train if cfg.labelled is None else cfg.labelled
    if n_lab > n_train:
        raise ConfigError(
            f"data.labelled={n_lab} exceeds the {n_train} examples of the {cfg.name} training pool left after "
            f"the {n_val} validation examples (data.validation={cfg.validation}); lower one of them"
        )
    rest_count = n_train - n_lab
    n_transfer = rest_count if cfg.transfer is None else cfg.transfer
    if n_transfer > rest_count:
        raise ConfigError(
            f"data.labelled={n_lab}, data.transfer={n_transfer} and the {n_val} validation examples "
            f"(data.validation={cfg.validation}) together exceed the {n_pool} examples of the {cfg.name} "
            "training pool; lower one of them (transfer: null takes all the rest)"
        )
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    index = torch.arange(n_pool)
    free = torch.ones(n_pool, dtype=torch.bool)
    val_pos = stratified_sample(y_pool, n_val, g) if n_val else index[:0]
    free[val_pos] = False
    remaining = index[free]
    lab_pos = (
        remaining if n_lab == len(remaining) else remaining[stratified_sample(y_pool[remaining], n_lab, g)]
    )
    free[lab_pos] = False
    rest = index[free]
    transfer_pos = rest[torch.randperm(len(rest), generator=g)[:n_transfer]].sort().values
    pool = ArrayDataset(x_pool, y_pool, index)
    test = ArrayDataset(x_test, y_test, torch.arange(len(y_test)))
    labelled = pool.subset(lab_pos)
    clean = None
    if cfg.label_noise is not None and cfg.label_noise.rate > 0:
        noise = cfg.label_noise
        g_noise = torch.Generator().manual_seed(1_000_003 * noise.seed + 7919 * seed + 17)
        clean = labelled.y
        noisy = corrupt_labels(clean, len(names), noise.rate, noise.kind, g_noise)
        labelled = ArrayDataset(labelled.x, noisy, labelled.index)
    return ClassificationData(
        name=cfg.name,
        labelled=labelled,
        clean_labels=clean,
        transfer=pool.subset(transfer_pos).without_labels(),
        validation=pool.subset(val_pos),
        test=test,
        input_shape=tuple(x_pool.shape[1:]),
        num_classes=len(names),
        class_names=names,
    )


__all__ = [
    "DATASETS",
    "UNLABELLED",
    "ArrayDataset",
    "AugmentConfig",
    "ClassificationData",
    "ImageDataConfig",
    "LabelNoiseConfig",
    "augment_batch",
    "corrupt_labels",
    "load_classification_data",
    "stratified_sample",
]
