"""Loss terms of semi-supervised teacher-student training and of DeiT's distillation token.

* ``pseudo_label``: cross-entropy to the teacher's confident predictions (FixMatch's hard labels,
  Noisy Student's soft ones), :func:`distillery.functional.pseudo_label_loss`;
* ``consistency_mse``: Mean Teacher's squared distance between softmax outputs,
  :func:`distillery.functional.consistency_mse`;
* ``deit``: DeiT's distillation-token loss: the student's *distillation head* (``features[DEIT_DIST]``,
  from :class:`~distillery.models.vit.DeiTAdapter`) learns the teacher's hard decision (or its soft
  distribution), while the class head learns the labels through ``ce``.

Every row of the batch counts (labelled or not): a row's label is not used by these terms.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from distillery import functional as DF
from distillery.losses.base import LossInputs, LossTerm, TermConfig
from distillery.losses.logit import _FunctionalTerm
from distillery.models.vit import DEIT_DIST  # the distillation head's logits [B, C]


class PseudoLabelConfig(TermConfig):
    """FixMatch / Noisy Student: cross-entropy to the teacher's predictions above a confidence threshold."""

    name: Literal["pseudo_label"] = "pseudo_label"
    threshold: float = Field(
        0.95, ge=0.0, le=1.0, description="confidence the teacher needs (FixMatch: 0.95)"
    )
    hard: bool = Field(True, description="one-hot targets (FixMatch) or the teacher's distribution (soft)")
    temperature: float = Field(1.0, gt=0.0, description="temperature of the teacher's softmax")


class PseudoLabelLoss(_FunctionalTerm):
    function = staticmethod(DF.pseudo_label_loss)

    def __init__(self, threshold: float = 0.95, hard: bool = True, temperature: float = 1.0) -> None:
        super().__init__(threshold=threshold, hard=hard, temperature=temperature)


class ConsistencyMSEConfig(TermConfig):
    """Mean Teacher's consistency cost: squared distance of the softmax outputs (per class mean)."""

    name: Literal["consistency_mse"] = "consistency_mse"
    temperature: float = Field(1.0, gt=0.0, description="temperature of both softmaxes (paper: 1)")


class ConsistencyMSELoss(_FunctionalTerm):
    function = staticmethod(DF.consistency_mse)

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature=temperature)


class DeiTConfig(TermConfig):
    """DeiT: the distillation token's head learns the teacher's top-1 class (hard) or its distribution."""

    name: Literal["deit"] = "deit"
    hard: bool = Field(True, description="the teacher's argmax as the label (DeiT's best) or soft KL")
    temperature: float = Field(3.0, gt=0.0, description="soft distillation's temperature (DeiT: 3)")


class DeiTLoss(LossTerm):
    """DeiT's distillation term on the distillation head ``features[DEIT_DIST]``:

    * hard (the paper's ``hard`` distillation, its best): :math:`\\mathrm{CE}(\\psi(Z_d), y_t)` with
      :math:`y_t = \\arg\\max_c Z_t(c)`;
    * soft: :math:`\\tau^2\\, \\mathrm{KL}(\\psi(Z_t/\\tau) \\| \\psi(Z_d/\\tau))`.

    From "Training data-efficient image transformers & distillation through attention" (Touvron et
    al., ICML 2021). The paper's objective is ``0.5 ce + 0.5 deit`` (set the weights), and at test time
    the model averages the two heads' logits (as the official ``forward`` does)."""

    supports_row_weight: ClassVar[bool] = False

    def __init__(self, hard: bool = True, temperature: float = 3.0) -> None:
        super().__init__()
        self.hard, self.temperature = hard, temperature

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        dist = inputs.student_features.get(DEIT_DIST)
        if dist is None:
            raise ValueError(
                "loss term deit needs the student's distillation head (a ViT student with "
                "distillation_token: true)"
            )
        teacher = self._teacher_logits(inputs).detach()
        if self.hard:
            return DF.cross_entropy(dist, teacher.argmax(-1), mask=inputs.mask, num_valid=num_valid)
        return DF.forward_kl(dist, teacher, self.temperature, mask=inputs.mask, num_valid=num_valid)

    def extra_repr(self) -> str:
        return f"hard={self.hard}" + ("" if self.hard else f", temperature={self.temperature}")


SEMI_SUPERVISED_LOSSES = {
    "pseudo_label": (PseudoLabelConfig, PseudoLabelLoss),
    "consistency_mse": (ConsistencyMSEConfig, ConsistencyMSELoss),
    "deit": (DeiTConfig, DeiTLoss),
}

__all__ = [
    "DEIT_DIST",
    "SEMI_SUPERVISED_LOSSES",
    "ConsistencyMSEConfig",
    "ConsistencyMSELoss",
    "DeiTConfig",
    "DeiTLoss",
    "PseudoLabelConfig",
    "PseudoLabelLoss",
]
