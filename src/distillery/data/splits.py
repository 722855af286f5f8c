"""Per-seed splits of a training pool: validation, labelled and transfer, drawn the same way for every
classification dataset (built-in or the user's files), so that a run seed means the same thing for all.

The validation split is drawn first (class-balanced), then the labelled split (class-balanced), then
the transfer split uniformly from what is left of the pool followed by any extra unlabelled rows; the
splits are disjoint. With label noise, a fraction of the labelled split's labels is corrupted (the
validation and test labels stay clean).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distillery.data.base import ArrayDataset, stratified_sample
from distillery.data.noise import LabelNoiseConfig, corrupt_labels
from distillery.errors import ConfigError


@dataclass
class Splits:
    """The seed's training splits; ``clean_labels``: the labelled split's true labels under label noise."""

    labelled: ArrayDataset
    transfer: ArrayDataset  # labels hidden (-100)
    validation: ArrayDataset
    clean_labels: Tensor | None = None


def validation_count(validation: int | float, pool: int) -> int:
    """How many of ``pool`` examples a validation setting takes: a fraction (< 1) or a count."""
    if isinstance(validation, float):
        return round(validation * pool)
    return validation


def draw_splits(
    pool: ArrayDataset,
    *,
    seed: int,
    num_classes: int,
    name: str,
    validation: int | float,
    labelled: int | None,
    transfer: int | None,
    label_noise: LabelNoiseConfig | None = None,
    unlabelled: ArrayDataset | None = None,
) -> Splits:
    """Draw run ``seed``'s validation, labelled and transfer splits from ``pool``.

    Args:
        pool: the training pool, ``index`` = positions ``0..N-1``.
        seed: the run seed (the draw is a pure function of it).
        num_classes: classes of the labels (for label noise).
        name: the dataset's name, for messages.
        validation: ``data.validation``: a fraction (< 1) of the pool or a count (0: none).
        labelled: ``data.labelled``: labelled examples (None: the pool minus the validation split).
        transfer: ``data.transfer``: unlabelled examples (None: all that is left).
        label_noise: ``data.label_noise``.
        unlabelled: extra unlabelled rows (a transfer file), candidates for the transfer split after
            the rest of the pool; their ``index`` must not collide with the pool's.

    Raises:
        ConfigError: the counts do not fit in the pool (the message names the fields to lower).
    """
    y_pool = pool.y
    n_pool = len(y_pool)
    n_extra = 0 if unlabelled is None else len(unlabelled)
    n_val = validation_count(validation, n_pool)
    if n_val >= n_pool:
        raise ConfigError(f"data.validation={validation} leaves no training examples ({n_pool} in the pool)")
    n_train = n_pool - n_val
    n_lab = n_train if labelled is None else labelled
    if n_lab > n_train:
        raise ConfigError(
            f"data.labelled={n_lab} exceeds the {n_train} examples of the {name} training pool left after "
            f"the {n_val} validation examples (data.validation={validation}); lower one of them"
        )
    rest_count = n_train - n_lab + n_extra
    n_transfer = rest_count if transfer is None else transfer
    if n_transfer > rest_count:
        extra = f" plus the {n_extra} rows of data.unlabelled" if n_extra else ""
        raise ConfigError(
            f"data.labelled={n_lab}, data.transfer={n_transfer} and the {n_val} validation examples "
            f"(data.validation={validation}) together exceed the {n_pool} examples of the {name} "
            f"training pool{extra}; lower one of them (transfer: null takes all the rest)"
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
    pick = torch.randperm(len(rest) + n_extra, generator=g)[:n_transfer].sort().values
    if n_extra:  # positions past the pool's rest are rows of the unlabelled file
        candidates = pool.concat(pool.subset(rest), unlabelled)
        transfer_set = candidates.subset(pick)
    else:
        transfer_set = pool.subset(rest[pick])
    labelled_set = pool.subset(lab_pos)
    clean = None
    if label_noise is not None and label_noise.rate > 0:
        g_noise = torch.Generator().manual_seed(1_000_003 * label_noise.seed + 7919 * seed + 17)
        clean = labelled_set.y
        noisy = corrupt_labels(clean, num_classes, label_noise.rate, label_noise.kind, g_noise)
        labelled_set = replace(labelled_set, y=noisy)
    return Splits(
        labelled=labelled_set,
        transfer=transfer_set.without_labels(),
        validation=pool.subset(val_pos),
        clean_labels=clean,
    )
