"""Hugging Face classifiers as teachers or students of a classification run: ``model: {pretrained: ...}``.

``AutoModelForImageClassification`` (image datasets) or ``AutoModelForSequenceClassification`` (text),
chosen from the saved model's ``architectures`` (or ``kind``), loaded from a local directory or a hub
id with ``from_pretrained``. The loaded model is wrapped so that it takes the run's inputs and returns
logits, like every other architecture of the run; the wrapped model is the ``model`` attribute, and a
saved student is also written with ``save_pretrained`` for use outside distillery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.hub import from_pretrained

AUTO_CLASSES = {"image": "AutoModelForImageClassification", "sequence": "AutoModelForSequenceClassification"}


class PretrainedClassifierConfig(StrictModel):
    """A pretrained Hugging Face classifier (``model: {pretrained: <directory or hub id>}``)."""

    name: Literal["pretrained"] = "pretrained"
    pretrained: str = Field(description="a directory saved with save_pretrained, or a hub id")
    kind: Literal["auto", "image", "sequence"] = Field(
        "auto",
        description="image: AutoModelForImageClassification; sequence: AutoModelForSequenceClassification; "
        "auto: from the saved config's `architectures`",
    )
    new_head: bool = Field(
        False,
        description="replace the classification head with a freshly initialised one for the run's classes "
        "(fine-tuning a backbone trained on other labels); false: the model's labels must match the data's",
    )


class ImageClassifier(nn.Module):
    """``x [B, C, H, W] -> logits [B, num_classes]`` through a Hugging Face image classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def resolve_kind(cfg: PretrainedClassifierConfig, field: str = "model") -> str:
    """``image`` or ``sequence``: ``cfg.kind``, or read from the saved config's ``architectures``.

    ``field`` is the config section of the model (``student``, ``teacher.model``), for messages.
    """
    if cfg.kind != "auto":
        return cfg.kind
    import transformers

    config = from_pretrained(
        transformers.AutoConfig.from_pretrained, cfg.pretrained, f"{field}.pretrained", "config"
    )
    names = " ".join(config.architectures or [])
    for kind, suffix in (("image", "ForImageClassification"), ("sequence", "ForSequenceClassification")):
        if suffix in names:
            return kind
    raise ConfigError(
        f"{field}.pretrained={cfg.pretrained!r} is a {names or type(config).__name__} model, not an image or "
        f"sequence classifier; set {field}.kind=image or {field}.kind=sequence to load it with that auto class"
    )


def build_pretrained_classifier(
    cfg: PretrainedClassifierConfig, input_shape: tuple[int, ...], num_classes: int, field: str = "model"
) -> nn.Module:
    """The pretrained classifier of ``cfg``, wrapped to take the run's image tensors ``[B, *input_shape]``.

    ``field`` is the config section of the model (``student``, ``teacher.model``), for messages.

    Raises:
        ConfigError: the directory or hub id does not load (see :mod:`distillery.models.hub`), or the
            model does not fit the data (classes, channels, a text classifier).
    """
    import transformers

    where = f"{field}.pretrained"
    kind = resolve_kind(cfg, field)
    if kind == "sequence":
        raise ConfigError(
            f"{where}={cfg.pretrained!r} is a sequence (text) classifier, but this run's data are "
            f"images of shape {tuple(input_shape)}; use an image classifier, or distil it from Python with "
            "FrozenTeacher.from_pretrained(..., task='sequence-classification') on tokenised text"
        )
    auto = getattr(transformers, AUTO_CLASSES[kind])
    kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if cfg.new_head else {}
    model = from_pretrained(auto.from_pretrained, cfg.pretrained, where, **kwargs)
    labels = model.config.num_labels
    if labels != num_classes:
        raise ConfigError(
            f"{where}={cfg.pretrained!r} predicts {labels} classes, the data has {num_classes}; set "
            "new_head: true in that model section to train a new head for the data's classes"
        )
    channels = getattr(model.config, "num_channels", None)
    if channels is not None and len(input_shape) == 3 and channels != input_shape[0]:
        raise ConfigError(
            f"{where}={cfg.pretrained!r} takes {channels}-channel images, the data has "
            f"{input_shape[0]} channel(s) (input shape {tuple(input_shape)})"
        )
    return ImageClassifier(model)


def save_pretrained_student(student: nn.Module, directory: Path) -> bool:
    """``save_pretrained`` of a wrapped Hugging Face student into ``directory``; False for other models."""
    if not isinstance(student, ImageClassifier):
        return False
    student.model.save_pretrained(directory)
    return True
