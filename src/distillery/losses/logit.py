"""Loss terms over class (or token) logits: thin modules over :mod:`distillery.functional`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from distillery import functional as DF
from distillery.losses.base import IGNORE_INDEX, LossInputs, LossTerm, TermConfig, labelled_rows


class CrossEntropyConfig(TermConfig):
    """Cross-entropy with the hard labels, averaged over labelled rows."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class CrossEntropyLoss(LossTerm):
    """Supervised cross-entropy; unlabelled rows (transfer set) do not count."""

    needs_teacher: ClassVar[bool] = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        return DF.cross_entropy(
            inputs.student_logits,
            inputs.target,
            mask=inputs.mask,
            num_valid=num_valid,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )


class ForwardKLConfig(TermConfig):
    """T^2 * KL(teacher || student) at temperature T, averaged over all valid rows."""

    name: Literal["forward_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    vocab_size: int | None = Field(None, ge=1, description="compare only the first vocab_size classes")


class ForwardKLLoss(LossTerm):
    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.vocab_size = vocab_size

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        return DF.forward_kl(
            inputs.student_logits,
            self._teacher_logits(inputs),
            self.temperature,
            mask=inputs.mask,
            num_valid=num_valid,
            vocab_size=self.vocab_size,
        )


class KDConfig(TermConfig):
    """Hinton's KD: alpha * T^2 * KL + (1 - alpha) * CE per row (CE only on labelled rows)."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0.0, description="student temperature (and teacher's by default)")
    alpha: float = Field(
        0.9, description="weight of the KL part; may exceed 1 (self-distillation under noise)"
    )
    teacher_temperature: float | None = Field(None, gt=0.0, description="separate teacher temperature (LTD)")
    vocab_size: int | None = Field(None, ge=1)


class KDLoss(LossTerm):
    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_temperature: float | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_temperature = teacher_temperature
        self.vocab_size = vocab_size

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        return DF.kd_loss(
            inputs.student_logits,
            self._teacher_logits(inputs),
            inputs.target,
            self.temperature,
            self.alpha,
            teacher_temperature=self.teacher_temperature,
            mask=inputs.mask,
            num_valid=num_valid,
            ignore_index=IGNORE_INDEX,
            vocab_size=self.vocab_size,
        )
