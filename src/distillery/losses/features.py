"""Loss terms over named intermediate features (``ModelOutput.features``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from distillery import functional as DF
from distillery.losses.base import LossInputs, LossTerm, TermConfig
from distillery.models.adapters import HINT_FEATURE


class HintConfig(TermConfig):
    """Feature hints: mean squared difference between student and teacher features (FitNets, BYOT)."""

    name: Literal["hint"] = "hint"
    feature: str = Field(
        HINT_FEATURE,
        description="name of the feature both the student and the teacher output (multi-exit students "
        "with teacher.exits.hint_at output 'hint')",
    )


class HintLoss(LossTerm):
    """:func:`distillery.functional.hint_loss` between ``student_features[feature]`` and
    ``teacher_features[feature]``, both ``[..., F]`` with the leading shape of the rows."""

    supports_row_weight: ClassVar[bool] = True

    def __init__(self, feature: str = HINT_FEATURE) -> None:
        super().__init__()
        self.feature = feature

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        missing = [
            side
            for side, features in (("student", inputs.student_features), ("teacher", inputs.teacher_features))
            if self.feature not in features
        ]
        if missing:
            raise ValueError(
                f"loss term 'hint' needs feature {self.feature!r} from the {' and the '.join(missing)}, "
                "which did not output it; with a multi-exit student set teacher.exits.hint_at to the module "
                "whose features the exits should learn"
            )
        student = inputs.student_features[self.feature]
        teacher = inputs.teacher_features[self.feature]
        if inputs.row_weight is None:
            return DF.hint_loss(student, teacher, mask=inputs.mask, num_valid=num_valid)
        per_row = DF.hint_loss(student, teacher, mask=inputs.mask, reduction="none")
        return self._weighted(per_row, inputs, inputs.mask, num_valid)

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}"
