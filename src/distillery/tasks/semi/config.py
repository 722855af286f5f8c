"""The config of a semi-supervised teacher-student run (``task: semi``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from distillery.configbase import StrictModel
from distillery.data import ImageDataConfig
from distillery.data.views import NoiseConfig
from distillery.losses import LOSSES, LossTermConfig
from distillery.models import ModelConfig, named_model
from distillery.tasks.base import DistillationConfigBase
from distillery.tasks.classification.config import ClassificationEvalConfig


class MeanTeacherConfig(StrictModel):
    """Mean Teacher: the teacher is an exponential moving average of the student's weights."""

    source: Literal["ema"] = "ema"
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="EMA momentum (Mean Teacher: 0.99, then 0.999)")
    momentum_end: float | None = Field(
        None, ge=0.0, le=1.0, description="cosine-ramp the momentum to this value over training"
    )


class SelfTeacherConfig(StrictModel):
    """FixMatch: the teacher is the student itself, its current weights, on the weak view (no gradient)."""

    source: Literal["self"] = "self"


class GenerationsTeacherConfig(StrictModel):
    """Noisy Student: generation 0 is the supervised student (the baseline arm); generation k learns
    from generation k-1, frozen and un-noised, on the labelled and pseudo-labelled images, under noise."""

    source: Literal["generations"] = "generations"
    generations: int = Field(2, ge=1, description="student generations after the supervised generation 0")
    students: list[ModelConfig | None] | None = Field(
        None,
        description="the architecture of generations 1, 2, ... (equal or larger than the one before; a null "
        "entry, or null for all: the student's)",
    )

    @field_validator("students", mode="before")
    @classmethod
    def _pretrained(cls, value: Any) -> Any:
        return [None if v is None else named_model(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_per_generation(self) -> GenerationsTeacherConfig:
        if self.students is not None and len(self.students) != self.generations:
            raise ValueError(
                f"conflicting fields: teacher.students lists {len(self.students)} architectures for "
                f"teacher.generations={self.generations}; give one per generation"
            )
        return self


SemiTeacherConfig = Annotated[
    MeanTeacherConfig | SelfTeacherConfig | GenerationsTeacherConfig, Field(discriminator="source")
]


class SemiNoiseConfig(StrictModel):
    """The input noise of each side: FixMatch's strong (student) and weak (teacher) views, Mean
    Teacher's two independent noises, Noisy Student's noised student and clean teacher."""

    student: NoiseConfig = Field(
        default_factory=lambda: NoiseConfig(crop_scale=(0.6, 1.0), hflip=0.5, jitter=0.8, cutout=0.4),
        description="the student's view of every training image",
    )
    teacher: NoiseConfig | None = Field(
        default_factory=lambda: NoiseConfig(crop_scale=(0.85, 1.0), hflip=0.5),
        description="the teacher's view (null: the clean image)",
    )
    labelled: Literal["student", "teacher"] | NoiseConfig = Field(
        "student",
        description="the student's view of a labelled image: the student's noise (Mean Teacher, Noisy Student), "
        "the teacher's (FixMatch's weak view for the supervised loss), or a noise of its own (e.g. to give "
        "several methods one labelled stream and so one supervised-only baseline)",
    )


class SemiConfig(DistillationConfigBase):
    """A semi-supervised run (``task: semi``): a student learns from a few labelled images and a
    teacher's outputs on many unlabelled ones. The ``baseline`` arm trains the same student on the
    labelled images alone (with the labelled rows' view, ``noise.labelled``): "supervised only"."""

    task: Literal["semi"] = "semi"
    data: ImageDataConfig = Field(
        default_factory=lambda: ImageDataConfig(labelled=100, transfer=None),
        description="labelled: the few labelled images; transfer: the unlabelled ones (null: the rest)",
    )
    student: ModelConfig
    teacher: SemiTeacherConfig = Field(default_factory=SelfTeacherConfig)
    noise: SemiNoiseConfig = Field(default_factory=SemiNoiseConfig)
    labelled_fraction: float = Field(
        0.125,
        gt=0.0,
        lt=1.0,
        description="share of each batch drawn from the labelled images (repeated): FixMatch's 1 / (1 + mu) "
        "with mu = 7",
    )
    eval: ClassificationEvalConfig = Field(default_factory=ClassificationEvalConfig)
    loss: dict[str, LossTermConfig] = Field(
        default_factory=lambda: {"ce": {"name": "ce"}, "pseudo_label": {"name": "pseudo_label"}}, min_length=1
    )

    @field_validator("student", mode="before")
    @classmethod
    def _pretrained_student(cls, value: Any) -> Any:
        return named_model(value)

    @model_validator(mode="after")
    def _consistent(self) -> SemiConfig:
        if self.data.transfer == 0:
            raise ValueError(
                "data.transfer=0: a semi-supervised run learns from unlabelled images, and this one has none; "
                "set data.transfer to their number (null: every training image that is not labelled)"
            )
        if self.data.labelled is None:
            raise ValueError(
                "data.labelled is null, which labels every training image and leaves none unlabelled; set it to "
                "the few labelled images (e.g. 600)"
            )
        users = [label for label, term in self.loss.items() if LOSSES[term.name][1].needs_teacher]
        if not users:
            raise ValueError(
                f"loss: no term learns from the teacher (loss: {', '.join(self.loss)}); add pseudo_label (FixMatch, "
                "Noisy Student) or consistency_mse (Mean Teacher)"
            )
        if not any(term.name == "ce" for term in self.loss.values()):
            raise ValueError("loss: a semi-supervised run needs `ce` for its labelled images; add loss.ce")
        if not self.baseline_enabled() and self.teacher.source == "generations":
            raise ValueError(
                "conflicting fields: teacher.source=generations starts from generation 0, the supervised student "
                "of the baseline arm; set baseline.enabled=true"
            )
        return self


__all__ = [
    "GenerationsTeacherConfig",
    "MeanTeacherConfig",
    "SelfTeacherConfig",
    "SemiConfig",
    "SemiNoiseConfig",
]
