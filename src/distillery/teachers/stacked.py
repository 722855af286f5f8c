"""Teachers read from the student's own forward pass: its deepest exit, or its peers."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from distillery.functional.ensemble import leave_one_out_logits
from distillery.models.adapters import HINT_FEATURE, ModelOutput
from distillery.teachers.base import BaseTeacher, TeacherOutput


def _stacked_logits(student_output: ModelOutput | None, who: str) -> Tensor:
    if student_output is None or student_output.logits is None or student_output.logits.dim() < 3:
        raise ValueError(
            f"the {who} teacher reads the student's stacked outputs [M, B, C]; call it as "
            "teacher(batch, student_output) with a multi-exit or peer-group student"
        )
    return student_output.logits.detach().float()


class DeepestExitTeacher(BaseTeacher):
    """Multi-exit self-distillation ("Be Your Own Teacher", Zhang et al., ICCV 2019; "One Model to
    Train them All: Hierarchical Self-Distillation for Enhanced Early Layer Embeddings"): every exit
    of ``[E, B, C]`` learns from the deepest exit, detached. The deepest exit's row is its own
    teacher, a divergence of exactly 0. With hint features ``[E, B, F]`` in the student's output
    (:class:`~distillery.models.exits.MultiExitAdapter`), the teacher's features are the last row
    (the deep module's pooled output), detached, for every exit (BYOT's feature hints).

    Example:
        >>> import torch
        >>> out = ModelOutput(logits=torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]]))  # E=2, B=1, C=2
        >>> DeepestExitTeacher()({}, out).logits
        tensor([[[2., 0.]],
        <BLANKLINE>
                [[2., 0.]]])
    """

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        logits = _stacked_logits(student_output, "exits")
        features = {}
        hints = student_output.features.get(HINT_FEATURE)
        if hints is not None:  # (E, B, F): every exit's hint learns the deepest row, the hint target
            hints = hints.detach()
            features[HINT_FEATURE] = hints[-1:].expand_as(hints)
        return TeacherOutput(logits=logits[-1:].expand_as(logits), features=features)


class PeersTeacher(BaseTeacher):
    r"""Deep mutual learning ("Deep Mutual Learning", Zhang et al., CVPR 2018): peer k's teacher is
    the mean predicted distribution of the other peers, detached:

    .. math::

        q_k = \frac{1}{K - 1} \sum_{j \ne k} \mathrm{softmax}(z_j)

    returned as logits :math:`\log q_k`. With K = 2 each peer learns from the other, as in the paper.

    Example:
        >>> import torch
        >>> z = torch.log(torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]], [[0.1, 0.9]]]))  # K=3, B=1, C=2
        >>> PeersTeacher()({}, ModelOutput(logits=z)).logits.exp()
        tensor([[[0.3000, 0.7000]],
        <BLANKLINE>
                [[0.5000, 0.5000]],
        <BLANKLINE>
                [[0.7000, 0.3000]]])
    """

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        logits = _stacked_logits(student_output, "peers")
        if logits.shape[0] < 2:
            raise ValueError("mutual learning needs at least 2 peers")
        return TeacherOutput(logits=leave_one_out_logits(logits))  # (K, B, C)
