"""Loss terms of self-supervised self-distillation: the student matches an EMA (or random) teacher's
outputs on other views of the same images.

The task's adapters put the head outputs of every view in ``features[SSL_OUT]``: ``[V_s, B, K]`` for
the student (global views first, then local ones) and ``[V_t, B, K]`` for the teacher (the global
views). A term averages over the images of its micro-batch and is scaled by ``local images / global
images``, as the representation terms are, so gradient accumulation and data parallelism weight the
micro-batches by their images.

State: DINO's centre is a buffer of the term (saved in checkpoints with the objective, restored on
resume). It is updated after each micro-batch's loss, with the mean over that micro-batch on every
process (all-reduced when ``torch.distributed`` is initialised): with gradient accumulation it is
updated once per micro-batch rather than once per optimizer step, a documented difference from DINO's
code, where one step is one batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import Tensor

from distillery import functional as DF
from distillery.losses.base import LossInputs, LossTerm, TermConfig
from distillery.models.ssl import SSL_OUT, SSL_PRED  # head outputs [V, B, K]; predictions [V, B, D]


def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over processes when a process group is up (a copy; the input is untouched)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class SelfSupervisedTermConfig(TermConfig):
    """Base of the terms that need multi-view batches and a teacher of the same network (task: ssl)."""


class DINOConfig(SelfSupervisedTermConfig):
    """DINO's cross-view cross-entropy from the centred, sharpened teacher to the student."""

    name: Literal["dino"] = "dino"
    student_temperature: float = Field(0.1, gt=0.0, description="student softmax temperature (DINO: 0.1)")
    teacher_temperature: float = Field(
        0.04, gt=0.0, description="teacher softmax temperature after the warm-up (DINO: 0.04-0.07)"
    )
    teacher_temperature_start: float | None = Field(
        None, gt=0.0, description="teacher temperature at the start of the warm-up (null: no warm-up)"
    )
    teacher_temperature_warmup_epochs: float = Field(
        0.0, ge=0.0, description="epochs of the linear teacher-temperature warm-up (DINO: 30 of 100)"
    )
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the centre (DINO: 0.9)")

    @model_validator(mode="after")
    def _warmup(self) -> DINOConfig:
        if self.teacher_temperature_start is not None and self.teacher_temperature_warmup_epochs == 0:
            raise ValueError(
                "conflicting fields: teacher_temperature_start is set but teacher_temperature_warmup_epochs is 0; "
                "give the warm-up a length"
            )
        return self


class DINOLoss(LossTerm):
    """:func:`distillery.functional.dino_loss` over ``features[SSL_OUT]``, with the centre as a buffer."""

    def __init__(
        self,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        teacher_temperature_start: float | None = None,
        teacher_temperature_warmup_epochs: float = 0.0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.teacher_temperature_start = teacher_temperature_start
        self.warmup_epochs = teacher_temperature_warmup_epochs
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(0))  # sized [K] at the first batch
        # entropies of the last batch's targets (collapse signs, read by the task's validation)
        self.targets_entropy: dict[str, float] = {}

    def teacher_temperature_at(self, epoch: float) -> float:
        """The teacher temperature at (fractional) ``epoch``: linear warm-up, then constant."""
        start = self.teacher_temperature_start
        if start is None or self.warmup_epochs <= 0 or epoch >= self.warmup_epochs:
            return self.teacher_temperature
        return start + (self.teacher_temperature - start) * epoch / self.warmup_epochs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "center")
        if saved is not None and saved.shape != self.center.shape:
            self.center = torch.zeros_like(saved, device=self.center.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        for side, feats in (("student", inputs.student_features), ("teacher", inputs.teacher_features)):
            if SSL_OUT not in feats:
                raise ValueError(
                    f"loss term dino needs the {side}'s head outputs of every view ({SSL_OUT!r}); it runs in the "
                    "self-supervised task (task: ssl)"
                )
        student, teacher = inputs.student_features[SSL_OUT], inputs.teacher_features[SSL_OUT].detach()
        if self.center.numel() == 0:
            self.center = torch.zeros(teacher.shape[-1], dtype=torch.float32, device=teacher.device)
        temperature = self.teacher_temperature_at(inputs.epoch)
        local = DF.dino_loss(
            student,
            teacher,
            self.center,
            student_temperature=self.student_temperature,
            teacher_temperature=temperature,
        )
        per_image, mean = DF.dino_target_entropies(
            teacher, self.center, temperature, all_reduce=_all_reduce_sum
        )
        self.targets_entropy = {"teacher_entropy": per_image, "teacher_mean_entropy": mean}
        if self.training:
            self.center = DF.update_center(
                self.center, teacher, momentum=self.center_momentum, all_reduce=_all_reduce_sum
            )
        return self._local_share(local, inputs.mask, num_valid)

    def extra_repr(self) -> str:
        return (
            f"student_temperature={self.student_temperature}, teacher_temperature={self.teacher_temperature}, "
            f"center_momentum={self.center_momentum}"
        )


class BYOLConfig(SelfSupervisedTermConfig):
    """BYOL's normalised MSE from the student's predictions to the teacher's projections of other views."""

    name: Literal["byol"] = "byol"


class BYOLLoss(LossTerm):
    """:func:`distillery.functional.byol_loss` between the student's prediction of view j and the
    teacher's projection of view i, averaged over the pairs i != j (the paper's symmetrised loss for
    two views: both directions). Each pair's value is its mean over the images; BYOL's paper sums the
    two directions, this averages them (a factor 2 that the weight absorbs)."""

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        for side, feats, key in (
            ("student's predictions", inputs.student_features, SSL_PRED),
            ("teacher's projections", inputs.teacher_features, SSL_OUT),
        ):
            if key not in feats:
                raise ValueError(
                    f"loss term byol needs the {side} of every view ({key!r}); it runs in task: ssl with "
                    "model.predictor set"
                )
        pred, target = inputs.student_features[SSL_PRED], inputs.teacher_features[SSL_OUT].detach()
        pairs = [
            DF.byol_loss(pred[j], target[i])
            for i in range(target.shape[0])
            for j in range(pred.shape[0])
            if i != j
        ]
        if not pairs:
            raise ValueError("loss term byol needs at least two views (a view is never its own target)")
        local = torch.stack(pairs).mean()
        return self._local_share(local, inputs.mask, num_valid)


SELF_SUPERVISED_LOSSES = {"dino": (DINOConfig, DINOLoss), "byol": (BYOLConfig, BYOLLoss)}

__all__ = [
    "SELF_SUPERVISED_LOSSES",
    "SSL_OUT",
    "BYOLConfig",
    "BYOLLoss",
    "DINOConfig",
    "DINOLoss",
    "SelfSupervisedTermConfig",
]
