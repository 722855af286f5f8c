"""Text classifiers built from a config: token ids in, logits out.

Every text model takes ``x [B, L]``: int64 token ids of its own tokenizer, right-padded with a
negative id (-1) after each text's end, so one tensor carries both the ids and the mask. A model
reads only the first ``L'`` positions, ``L'`` the longest text in the batch, and its output for a
text never depends on the other texts of the batch (or on how much padding they bring).

Two architectures, both small and fast on a CPU:

- ``text_cnn``: a convolutional sentence classifier ("Convolutional Neural Networks for Sentence
  Classification", Kim 2014): embeddings, 1-D convolutions of several widths, max-pooling over
  time, dropout and a linear head.
- ``bow_mlp``: a bag of embeddings ("Bag of Tricks for Efficient Text Classification", Joulin et al.
  2017): the mean embedding of the text's tokens, optional hidden layers, a linear head.

Each brings its tokenizer (``tokenizer: {kind: bpe, vocab_size: 2000}``): a byte-level BPE (or plain
bytes) trained offline on the training texts by the data layer, so a run needs no download.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.adapters import ClassifierAdapter
from distillery.models.mlp import MLP

BYTE_VOCAB = 259  # 256 bytes + <pad>, <bos>, <eos> (distillery.data.text.tokenizer)


class TextTokenizerConfig(StrictModel):
    """The tokenizer of a text model built from a config, trained on the run's training texts (cached)."""

    kind: Literal["bpe", "byte"] = Field(
        "bpe",
        description="bpe: byte-level BPE trained on the training texts; byte: the 256 bytes, nothing learned",
    )
    vocab_size: int | None = Field(
        None,
        ge=BYTE_VOCAB,
        description=f"bpe: ids including 3 special tokens (null: 4096; fewer when the texts have fewer repeated "
        f"pairs); byte: null (always {BYTE_VOCAB})",
    )

    @model_validator(mode="after")
    def _byte_is_fixed(self) -> TextTokenizerConfig:
        if self.kind == "byte" and self.vocab_size not in (None, BYTE_VOCAB):
            raise ValueError(f"tokenizer.vocab_size must be null for kind=byte (always {BYTE_VOCAB})")
        return self


class TextCNNConfig(StrictModel):
    """Kim's CNN: embeddings -> one 1-D convolution per width (ReLU, max over time) -> dropout -> head."""

    name: Literal["text_cnn"] = "text_cnn"
    tokenizer: TextTokenizerConfig = Field(default_factory=TextTokenizerConfig)
    embed_dim: PositiveInt = Field(64, description="width of the token embeddings")
    channels: PositiveInt = Field(64, description="filters per convolution width")
    kernel_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [2, 3, 4], min_length=1, description="convolution widths, in tokens"
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the head")


class BowMLPConfig(StrictModel):
    """A bag of embeddings: the mean token embedding -> [Linear -> ReLU -> Dropout]* -> head."""

    name: Literal["bow_mlp"] = "bow_mlp"
    tokenizer: TextTokenizerConfig = Field(default_factory=TextTokenizerConfig)
    embed_dim: PositiveInt = Field(32, description="width of the token embeddings")
    hidden: list[PositiveInt] = Field(
        default_factory=list, description="widths of hidden layers after the mean ([] = a linear head)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the mean and each hidden layer")


def split_padding(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` of right-padded token ids ``x [B, L]`` (negative = padding), cut to the longest
    text of the batch: ``ids [B, L']`` with padding replaced by 0, ``mask [B, L']`` True on tokens."""
    mask = x >= 0  # (B, L)
    width = max(int(mask.sum(dim=1).max()), 1) if x.numel() else 1
    mask = mask[:, :width]
    return x[:, :width].clamp_min(0), mask  # (B, L'), (B, L')


class TextCNN(nn.Module):
    """``x [B, L]`` token ids (negative = padding) -> logits ``[B, num_classes]``."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed_dim: int = 64,
        channels: int = 64,
        kernel_sizes: list[int] | tuple[int, ...] = (2, 3, 4),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        # padding k - 1 on both sides: every window that holds at least one token is computed
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, k, padding=k - 1) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(kernel_sizes), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = split_padding(x)  # (B, L)
        e = (self.embed(ids) * mask.unsqueeze(-1)).transpose(1, 2)  # (B, E, L), zeros at padding
        lengths = mask.sum(dim=1)  # (B,)
        pooled = []
        for conv in self.convs:
            h = torch.relu(conv(e))  # (B, C, L + k - 1)
            k = conv.kernel_size[0]
            # windows past the text's end see only padding: masked, so the batch's width never matters
            ends = (lengths + k - 1).unsqueeze(1)  # (B, 1)
            valid = torch.arange(h.shape[-1], device=x.device) < ends  # (B, L + k - 1)
            pooled.append(h.masked_fill(~valid.unsqueeze(1), 0.0).amax(dim=-1))  # (B, C); ReLU outputs >= 0
        return self.head(self.dropout(torch.cat(pooled, dim=1)))  # (B, num_classes)


class BowMLP(nn.Module):
    """``x [B, L]`` token ids (negative = padding) -> logits ``[B, num_classes]`` from the mean embedding."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed_dim: int = 32,
        hidden: list[int] | tuple[int, ...] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        # the MLP of distillery.models.mlp over the mean embedding (dropout on its input too)
        self.mlp = MLP(embed_dim, num_classes, hidden, dropout, input_dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = split_padding(x)  # (B, L)
        e = self.embed(ids) * mask.unsqueeze(-1)  # (B, L, E)
        mean = e.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, E)
        return self.mlp(mean)  # (B, num_classes)


class KeyedClassifierAdapter(ClassifierAdapter):
    """A :class:`ClassifierAdapter` that gives the model ``batch[input_key]`` instead of ``batch["x"]``:
    a teacher whose tokenizer is not the student's reads its own token ids for the same texts."""

    def __init__(self, input_key: str) -> None:
        self.input_key = input_key


def _needs_text(name: str, input_shape: tuple[int, ...], vocab_size: int | None, field: str) -> int:
    if vocab_size is None:
        raise ConfigError(
            f"{field}: the {name} model takes text, but this run's data are numbers of shape {tuple(input_shape)}; "
            "give text data (data: {{name: files, text_field: ...}}) or use mlp / cnn"
        )
    return vocab_size


def build_text_cnn(
    cfg: TextCNNConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    field: str = "model",
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> TextCNN:
    vocab = _needs_text("text_cnn", input_shape, vocab_size, field)
    return TextCNN(vocab, num_classes, cfg.embed_dim, cfg.channels, cfg.kernel_sizes, cfg.dropout)


def build_bow_mlp(
    cfg: BowMLPConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    field: str = "model",
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> BowMLP:
    vocab = _needs_text("bow_mlp", input_shape, vocab_size, field)
    return BowMLP(vocab, num_classes, cfg.embed_dim, cfg.hidden, cfg.dropout)
