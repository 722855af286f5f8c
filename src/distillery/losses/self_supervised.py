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
from distillery.models.ssl import (  # head outputs [V, B, K]; predictions [V, B, D]; tokens [G, B, P, .]
    SSL_BLOCKS,
    SSL_EMBED,
    SSL_MASK,
    SSL_OUT,
    SSL_PATCH,
    SSL_PRED,
)


def _need(inputs: LossInputs, term: str, wants: list[tuple[str, str, str]], fix: str) -> None:
    """A clear error when the adapters did not give a term what it reads."""
    for side, key, what in wants:
        feats = inputs.student_features if side == "student" else inputs.teacher_features
        if key not in feats:
            raise ValueError(f"loss term {term} needs the {side}'s {what} ({key!r}); {fix}")


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
        return self._warmed_up(self.teacher_temperature, epoch)

    def _warmed_up(self, end: float, epoch: float) -> float:
        start = self.teacher_temperature_start
        if start is None or self.warmup_epochs <= 0 or epoch >= self.warmup_epochs:
            return end
        return start + (end - start) * epoch / self.warmup_epochs

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


class IBOTConfig(DINOConfig):
    """iBOT: DINO's [CLS] term on masked student views plus the masked-patch term (own centre)."""

    name: Literal["ibot"] = "ibot"
    teacher_patch_temperature: float = Field(
        0.07, gt=0.0, description="teacher temperature of the patch targets (iBOT: 0.07 after warm-up)"
    )
    patch_center_momentum: float = Field(
        0.9, ge=0.0, le=1.0, description="EMA momentum of the patch centre (iBOT: 0.9)"
    )
    patch_weight: float = Field(1.0, ge=0.0, description="weight of the patch term (iBOT's lambda2: 1)")
    cls_weight: float = Field(1.0, ge=0.0, description="weight of the [CLS] term (iBOT's lambda1: 1)")


class IBOTLoss(DINOLoss):
    """``cls_weight`` x :func:`~distillery.functional.dino_loss` over the [CLS] outputs (the student's
    global views masked) + ``patch_weight`` x :func:`~distillery.functional.ibot_patch_loss` over the
    patch outputs of each global view against the teacher's on the same view unmasked.

    The patch centre is a second buffer, updated with the mean of the teacher's patch outputs over
    every patch (as ``iBOTLoss.update_center``). iBOT's warm-up of the patch temperature follows the
    [CLS] one here: both start at ``teacher_temperature_start`` and end at their own values. The head
    is shared between [CLS] and patches (iBOT's ``shared_head``)."""

    def __init__(
        self,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        teacher_temperature_start: float | None = None,
        teacher_temperature_warmup_epochs: float = 0.0,
        center_momentum: float = 0.9,
        teacher_patch_temperature: float = 0.07,
        patch_center_momentum: float = 0.9,
        patch_weight: float = 1.0,
        cls_weight: float = 1.0,
    ) -> None:
        super().__init__(
            student_temperature,
            teacher_temperature,
            teacher_temperature_start,
            teacher_temperature_warmup_epochs,
            center_momentum,
        )
        self.teacher_patch_temperature = teacher_patch_temperature
        self.patch_center_momentum = patch_center_momentum
        self.patch_weight, self.cls_weight = patch_weight, cls_weight
        self.register_buffer("patch_center", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "patch_center")
        if saved is not None and saved.shape != self.patch_center.shape:
            self.patch_center = torch.zeros_like(saved, device=self.patch_center.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patch_temperature_at(self, epoch: float) -> float:
        return self._warmed_up(self.teacher_patch_temperature, epoch)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        _need(
            inputs,
            "ibot",
            [
                ("student", SSL_PATCH, "patch outputs"),
                ("student", SSL_MASK, "masks"),
                ("teacher", SSL_PATCH, "patch outputs"),
            ],
            "it runs in task: ssl with a ViT backbone and views.mask set",
        )
        cls = super().forward(inputs, num_valid)
        student = inputs.student_features[SSL_PATCH]
        teacher = inputs.teacher_features[SSL_PATCH].detach()
        if self.patch_center.numel() == 0:
            self.patch_center = torch.zeros(teacher.shape[-1], dtype=torch.float32, device=teacher.device)
        local = DF.ibot_patch_loss(
            student,
            teacher,
            inputs.student_features[SSL_MASK],
            self.patch_center,
            student_temperature=self.student_temperature,
            teacher_temperature=self.patch_temperature_at(inputs.epoch),
        )
        if self.training:
            self.patch_center = DF.update_center(
                self.patch_center, teacher, momentum=self.patch_center_momentum, all_reduce=_all_reduce_sum
            )
        return self.cls_weight * cls + self.patch_weight * self._local_share(local, inputs.mask, num_valid)


class Data2VecConfig(SelfSupervisedTermConfig):
    """data2vec: regress the teacher's normalised top-K block average at the masked patches."""

    name: Literal["data2vec"] = "data2vec"
    top_k: int = Field(3, ge=1, description="average the teacher's last K blocks (data2vec ViT-B: 6 of 12)")
    instance_norm: bool = Field(True, description="instance-normalise each block over positions (the paper)")
    layer_norm_target: bool = Field(
        False, description="layer-normalise the average (the official vision recipe's choice)"
    )
    beta: float = Field(2.0, ge=0.0, description="smooth-L1 transition point; 0 = squared error (images: 2)")


class Data2VecLoss(LossTerm):
    """:func:`~distillery.functional.data2vec_loss` between the student's regression-head outputs on its
    masked global views (``SSL_PATCH``) and :func:`~distillery.functional.data2vec_targets` of the
    teacher's last blocks on the same views unmasked (``SSL_BLOCKS``), over the masked patches of all
    global views together. Positions are the patches ([CLS] is neither a target nor normalised with
    them)."""

    def __init__(
        self, top_k: int = 3, instance_norm: bool = True, layer_norm_target: bool = False, beta: float = 2.0
    ) -> None:
        super().__init__()
        self.top_k, self.instance_norm, self.layer_norm_target, self.beta = (
            top_k,
            instance_norm,
            layer_norm_target,
            beta,
        )

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        _need(
            inputs,
            "data2vec",
            [
                ("student", SSL_PATCH, "regression outputs at the patches"),
                ("student", SSL_MASK, "masks"),
                ("teacher", SSL_BLOCKS, "block outputs"),
            ],
            "it runs in task: ssl with a ViT backbone, model.head.kind=linear and views.mask set",
        )
        pred, masks = inputs.student_features[SSL_PATCH], inputs.student_features[SSL_MASK]
        blocks = inputs.teacher_features[SSL_BLOCKS]  # [k, G, B, P, D]
        target = DF.data2vec_targets(
            [b.flatten(0, 1) for b in blocks],
            min(self.top_k, blocks.shape[0]),
            instance_norm=self.instance_norm,
            layer_norm_target=self.layer_norm_target,
        )
        local = DF.data2vec_loss(pred.flatten(0, 1), target, masks.flatten(0, 1), beta=self.beta)
        return self._local_share(local, inputs.mask, num_valid)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, instance_norm={self.instance_norm}, beta={self.beta}"


class KoLeoConfig(SelfSupervisedTermConfig):
    """DINOv2's KoLeo regulariser on the student's embeddings of each global view."""

    name: Literal["koleo"] = "koleo"
    weight: float = Field(0.1, ge=0.0, description="weight of the term (DINOv2: 0.1)")


class KoLeoLoss(LossTerm):
    """:func:`~distillery.functional.koleo_loss` of the student's backbone embeddings (``SSL_EMBED``),
    per global view, averaged over the views (DINOv2 applies it to each global crop's [CLS] tokens).
    The nearest neighbours are searched in this process's micro-batch, as DINOv2 does per GPU."""

    needs_teacher = False

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        _need(inputs, "koleo", [("student", SSL_EMBED, "embeddings")], "it runs in task: ssl")
        embed = inputs.student_features[SSL_EMBED]
        local = torch.stack([DF.koleo_loss(e) for e in embed.unbind(0)]).mean()
        return self._local_share(local, inputs.mask, num_valid)


SELF_SUPERVISED_LOSSES = {
    "dino": (DINOConfig, DINOLoss),
    "ibot": (IBOTConfig, IBOTLoss),
    "data2vec": (Data2VecConfig, Data2VecLoss),
    "byol": (BYOLConfig, BYOLLoss),
    "koleo": (KoLeoConfig, KoLeoLoss),
}

__all__ = [
    "SELF_SUPERVISED_LOSSES",
    "SSL_OUT",
    "BYOLConfig",
    "BYOLLoss",
    "DINOConfig",
    "DINOLoss",
    "Data2VecConfig",
    "Data2VecLoss",
    "IBOTConfig",
    "IBOTLoss",
    "KoLeoConfig",
    "KoLeoLoss",
    "SelfSupervisedTermConfig",
]
