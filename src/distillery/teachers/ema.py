"""Mean teacher: an exponential moving average of the student's weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distillery.models.adapters import ClassifierAdapter
from distillery.teachers.base import BaseTeacher, TeacherOutput


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    r"""In place: :math:`\theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_s` for every parameter and
    floating-point buffer (BatchNorm running statistics); integer buffers (e.g. ``num_batches_tracked``)
    are copied from the student.

    From "Mean teachers are better role models: Weight-averaged consistency targets improve
    semi-supervised deep learning results" (Tarvainen and Valpola). ``momentum=1`` leaves the teacher
    unchanged; ``momentum=0`` copies the student.

    Example:
        >>> t, s = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.constant_(t.weight, 1.0), torch.nn.init.constant_(s.weight, 3.0)
        >>> ema_update(t, s, 0.75)
        >>> t.weight.item()
        1.5
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1]; got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_bufs, s_bufs = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        raise ValueError("the EMA teacher and the student must have the same architecture")
    for name, t in t_params.items():
        t.lerp_(s_params[name].detach().to(t.dtype), 1.0 - momentum)
    for name, t in t_bufs.items():
        s = s_bufs[name]
        if t.is_floating_point():
            t.lerp_(s.to(t.dtype), 1.0 - momentum)
        else:
            t.copy_(s)


def momentum_schedule(start: float, end: float, total_steps: int) -> list[float]:
    """Cosine ramp of the EMA momentum from ``start`` (step 1) to ``end`` (last step), as in BYOL/DINO.

    Example:
        >>> [round(m, 3) for m in momentum_schedule(0.9, 1.0, 3)]
        [0.9, 0.95, 1.0]
    """
    if total_steps <= 1:
        return [end] * max(total_steps, 0)
    return [
        end - (end - start) * (math.cos(math.pi * k / (total_steps - 1)) + 1) / 2 for k in range(total_steps)
    ]


class EMATeacher(BaseTeacher):
    """A moving average of the student, updated by the explicit ``update(student, step)`` call that the
    training loop makes after every optimizer step.

    Args:
        student: the student at initialisation; the teacher starts as a frozen copy of it.
        momentum: EMA momentum m (weight kept by the teacher per step).
        momentum_end: if given, m follows a cosine ramp from ``momentum`` to this value over
            ``total_steps`` (BYOL/DINO's schedule); else it is constant.
        total_steps: length of the ramp.
        adapter: how to call the network on a batch.
        batch_statistics: run the teacher in training mode (batch norm normalises with the batch's own
            statistics), as DINO's and BYOL's code do; the default, evaluation mode, uses the running
            statistics, which an EMA of the student's lags far behind at momenta near 1.
    """

    def __init__(
        self,
        student: nn.Module,
        momentum: float = 0.999,
        *,
        momentum_end: float | None = None,
        total_steps: int = 0,
        adapter=None,
        batch_statistics: bool = False,
    ) -> None:
        self.module = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.batch_statistics = batch_statistics
        self.momentum = momentum
        self.momentum_end = momentum_end
        self.schedule = (
            momentum_schedule(momentum, momentum_end, total_steps) if momentum_end is not None else None
        )
        self.adapter = adapter or ClassifierAdapter()
        self.updates = 0

    def momentum_at(self, step: int) -> float:
        """Momentum used by the update after optimizer step ``step`` (1-based)."""
        if self.schedule is None or not self.schedule:
            return self.momentum
        return self.schedule[min(step, len(self.schedule)) - 1]

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        self.module.train(self.batch_statistics)
        with torch.no_grad():
            out = self.adapter.forward(self.module, batch)
        logits = None if out.logits is None else out.logits.float()  # self-supervised heads: features only
        return TeacherOutput(logits=logits, features={k: v.float() for k, v in out.features.items()})

    def update(self, student: nn.Module, step: int) -> None:
        ema_update(self.module, student, self.momentum_at(step))
        self.updates += 1

    def to(self, device: torch.device | str) -> EMATeacher:
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.module.load_state_dict(state["module"])
            self.updates = int(state["updates"])
