"""Datasets: local files first (the real download path is kept), splits, augmentations.

Image classification datasets are named in YAML from :data:`DATASETS`, an explicit table; the
user's own files are ``name: files`` (:mod:`distillery.data.user`). Both draw a run seed's splits
with :func:`~distillery.data.splits.draw_splits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Discriminator, Field, Tag, field_validator

from distillery.configbase import StrictModel
from distillery.data.augment import AugmentConfig, augment_batch
from distillery.data.base import UNLABELLED, ArrayDataset, ClassificationData, stratified_sample
from distillery.data.noise import LabelNoiseConfig, corrupt_labels
from distillery.data.splits import draw_splits, validation_count
from distillery.data.tables import TableSource
from distillery.data.user import (
    TEXT_PAD,
    FilesDataConfig,
    KeyedDataset,
    UserClassificationData,
    UserData,
    load_user_data,
)
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

    @field_validator("name", mode="before")
    @classmethod
    def _known_name(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in DATASETS:
            raise ValueError(
                f"expected 'digits' or 'fashion_mnist', got {value!r}; or 'files' to read your own files "
                "(data: {name: files, train: <file>, text_field | features_field: <field>})"
            )
        return value

    @field_validator("validation")
    @classmethod
    def _fraction_below_one(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not value < 1.0:
            raise ValueError(f"a fraction of the training pool must be < 1 (or give a count); got {value}")
        return value

    def validation_count(self, pool: int) -> int:
        """How many of the ``pool`` training examples the validation split takes."""
        return validation_count(self.validation, pool)


def _data_tag(value: Any) -> str:
    """The member of :data:`DataConfig` a ``data`` section is: ``files``, else a built-in dataset."""
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return "files" if name == "files" else "digits"


# A classification run's `data` section: a built-in dataset (`digits`, `fashion_mnist`; the default
# when `name` is left out) or the user's files (`files`). Both built-in names validate as
# ImageDataConfig, tagged by its default name so that error messages drop the tag.
DataConfig = Annotated[
    Annotated[ImageDataConfig, Tag("digits")] | Annotated[FilesDataConfig, Tag("files")],
    Discriminator(_data_tag),
]


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


def load_classification_data(
    cfg: ImageDataConfig | FilesDataConfig, seed: int, tokenizers: Mapping[str, Any] | None = None
) -> ClassificationData:
    """Load the dataset and draw the validation, labelled and transfer splits for run ``seed``.

    The validation split is drawn first (class-balanced), then the labelled split (class-balanced) and
    the transfer split from the rest of the training pool (:func:`~distillery.data.splits.draw_splits`):
    the four splits are disjoint, and the test split is the same for every seed. The user's files
    (``name: files``) go through :func:`~distillery.data.user.load_user_data` (``tokenizers``: batch
    key -> tokenizer of text data).
    """
    if isinstance(cfg, FilesDataConfig):
        return load_user_data(cfg, seed, tokenizers)
    x_pool, y_pool, x_test, y_test, names = _pool_and_test(cfg)
    pool = ArrayDataset(x_pool, y_pool, torch.arange(len(y_pool)))
    drawn = draw_splits(
        pool,
        seed=seed,
        num_classes=len(names),
        name=cfg.name,
        validation=cfg.validation,
        labelled=cfg.labelled,
        transfer=cfg.transfer,
        label_noise=cfg.label_noise,
    )
    return ClassificationData(
        name=cfg.name,
        labelled=drawn.labelled,
        clean_labels=drawn.clean_labels,
        transfer=drawn.transfer,
        validation=drawn.validation,
        test=ArrayDataset(x_test, y_test, torch.arange(len(y_test))),
        input_shape=tuple(x_pool.shape[1:]),
        num_classes=len(names),
        class_names=names,
    )


__all__ = [
    "DATASETS",
    "TEXT_PAD",
    "UNLABELLED",
    "ArrayDataset",
    "AugmentConfig",
    "ClassificationData",
    "DataConfig",
    "FilesDataConfig",
    "ImageDataConfig",
    "KeyedDataset",
    "LabelNoiseConfig",
    "TableSource",
    "UserClassificationData",
    "UserData",
    "augment_batch",
    "corrupt_labels",
    "draw_splits",
    "load_classification_data",
    "load_user_data",
    "stratified_sample",
]
