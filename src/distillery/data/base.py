"""In-memory datasets of (input, label, sample id) and the split bundle a run trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNLABELLED = -100  # target value of rows without a label (transfer set, masked tokens)


@dataclass
class ArrayDataset:
    """Tensors indexed together: ``x [N, ...]`` float inputs, ``y [N]`` labels (-100 = unlabelled),
    ``index [N]`` stable sample ids (positions in the training pool, used by per-sample teachers)."""

    x: Tensor
    y: Tensor
    index: Tensor

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.index)):
            raise ValueError(
                f"x, y and index differ in length: {len(self.x)}, {len(self.y)}, {len(self.index)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        return {"x": self.x[indices], "y": self.y[indices], "index": self.index[indices]}

    def subset(self, positions: Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[positions], self.y[positions], self.index[positions])

    def without_labels(self) -> ArrayDataset:
        return ArrayDataset(self.x, torch.full_like(self.y, UNLABELLED), self.index)

    @staticmethod
    def concat(*parts: ArrayDataset) -> ArrayDataset:
        parts = tuple(p for p in parts if len(p) > 0)
        return ArrayDataset(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.index for p in parts]),
        )


@dataclass
class ClassificationData:
    """The splits of one run: a labelled training split, an unlabelled transfer split, a validation split
    (for evaluation during training) and a test split (evaluated once, at the end)."""

    name: str
    labelled: ArrayDataset
    transfer: ArrayDataset  # labels hidden (-100)
    test: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    clean_labels: Tensor | None = None  # the labelled split's true labels when label noise was added
    validation: ArrayDataset | None = None  # carved from the training pool, disjoint from the others

    def distillation_set(self) -> ArrayDataset:
        """Labelled and transfer examples together: what a distilled student trains on."""
        return ArrayDataset.concat(self.labelled, self.transfer)

    def describe(self) -> str:
        noise = ""
        if self.clean_labels is not None:
            wrong = (self.clean_labels != self.labelled.y).float().mean().item()
            noise = f" ({wrong:.0%} of them with wrong labels)"
        val = 0 if self.validation is None else len(self.validation)
        return (
            f"{self.name}: {len(self.labelled)} labelled{noise}, {len(self.transfer)} transfer (unlabelled), "
            f"{val} validation, {len(self.test)} test examples; input {self.input_shape}, {self.num_classes} classes"
        )


def stratified_sample(labels: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Positions of ``count`` examples with classes as balanced as the data allow (sorted).

    Takes ``count // K`` examples per class (more from the larger classes when ``count`` is not a
    multiple of K or a class runs short), each chosen uniformly at random with ``generator``.
    """
    classes = labels.unique()
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    by_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in by_class]
    take = [0] * len(by_class)
    remaining = count
    # Round-robin so the allocation is as even as the class sizes allow.
    while remaining > 0:
        progressed = False
        for k, idx in enumerate(by_class):
            if remaining == 0:
                break
            if take[k] < len(idx):
                take[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"asked for {count} examples but only {len(labels)} exist")
    chosen = torch.cat([idx[:n] for idx, n in zip(by_class, take)])
    return chosen.sort().values
