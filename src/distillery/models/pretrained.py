"""Hugging Face classifiers as teachers or students of a classification run: ``model: {pretrained: ...}``.

``AutoModelForImageClassification`` (image datasets) or ``AutoModelForSequenceClassification`` (text),
chosen from the saved model's ``architectures`` (or ``kind``), loaded from a local directory or a hub
id with ``from_pretrained``. The loaded model is wrapped so that it takes the run's inputs and returns
logits, like every other architecture of the run: images ``[B, C, H, W]``, or for text the token ids
of the model's own tokenizer (saved with it), right-padded with -1 (:mod:`distillery.models.text`).
The wrapped model is the ``model`` attribute, and a saved student is also written with
``save_pretrained`` (with its tokenizer, for text) for use outside distillery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.hub import from_pretrained
from distillery.models.text import split_padding

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


class SequenceClassifier(nn.Module):
    """``x [B, L] -> logits [B, num_classes]`` through a Hugging Face sequence classifier: ``x`` holds
    the ids of the model's tokenizer, right-padded with -1 (replaced by ``pad_token_id`` and masked)."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = split_padding(x)  # (B, L'), cut to the batch's longest text
        ids = ids.masked_fill(~mask, self.pad_token_id)
        return self.model(input_ids=ids, attention_mask=mask.long()).logits  # (B, num_classes)


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
    cfg: PretrainedClassifierConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    field: str = "model",
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """The pretrained classifier of ``cfg``, wrapped to take the run's inputs: image tensors
    ``[B, *input_shape]``, or (text data: ``vocab_size`` given, the length of the model's tokenizer)
    token ids ``[B, L]``.

    ``field`` is the config section of the model (``student``, ``teacher.model``), for messages.

    Raises:
        ConfigError: the directory or hub id does not load (see :mod:`distillery.models.hub`), or the
            model does not fit the data (classes, channels, text vs images, vocabulary).
    """
    import transformers

    where = f"{field}.pretrained"
    kind = resolve_kind(cfg, field)
    text = vocab_size is not None
    if kind == "sequence" and not text:
        what = "images" if len(input_shape) == 3 else "numbers"
        raise ConfigError(
            f"{where}={cfg.pretrained!r} is a sequence (text) classifier, but this run's data are "
            f"{what} of shape {tuple(input_shape)}; use an image classifier, or give text data "
            "(data: {name: files, text_field: <field>})"
        )
    if kind == "image" and text:
        raise ConfigError(
            f"{where}={cfg.pretrained!r} is an image classifier, but this run's data are text "
            f"(data.text_field); use a sequence classifier, or a text model (text_cnn, bow_mlp)"
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
    if text:
        embeddings = model.get_input_embeddings().num_embeddings
        if embeddings < vocab_size:
            raise ConfigError(
                f"{where}={cfg.pretrained!r}: its tokenizer has {vocab_size} ids but the model embeds only "
                f"{embeddings}; save the tokenizer the model was trained with beside it"
            )
        pad = 0 if pad_token_id is None else pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:  # last-token pooling (GPT-style) needs one
            model.config.pad_token_id = pad
        return SequenceClassifier(model, pad)
    channels = getattr(model.config, "num_channels", None)
    if channels is not None and len(input_shape) == 3 and channels != input_shape[0]:
        raise ConfigError(
            f"{where}={cfg.pretrained!r} takes {channels}-channel images, the data has "
            f"{input_shape[0]} channel(s) (input shape {tuple(input_shape)})"
        )
    return ImageClassifier(model)


def save_pretrained_student(student: nn.Module, directory: Path, tokenizer=None) -> bool:
    """``save_pretrained`` of a wrapped Hugging Face student into ``directory`` (and of its tokenizer,
    when given); False for other models."""
    if not isinstance(student, (ImageClassifier, SequenceClassifier)):
        return False
    student.model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return True
