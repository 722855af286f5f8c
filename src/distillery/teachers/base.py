"""The one Teacher protocol: ``teacher(batch) -> TeacherOutput``, plus an explicit ``update`` call.

The training loop never asks where a teacher's outputs come from (a frozen network, a table of
cached logits, an EMA of the student, an earlier generation...): it calls the teacher on the batch,
and after each optimizer step calls ``teacher.update(student, step)``, which stateful teachers use
and frozen ones ignore.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from distillery.models.adapters import ModelOutput

TeacherOutput = ModelOutput  # logits [..., C] aligned with the student's rows, plus named features


@runtime_checkable
class Teacher(Protocol):
    """Anything that maps a batch to teacher outputs and can be told that the student moved."""

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput: ...

    def observe(self, batch: Mapping[str, Tensor], student_output: ModelOutput) -> None: ...

    def update(self, student: nn.Module, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseTeacher:
    """Defaults for teachers without state: ``observe`` and ``update`` do nothing, the state is empty.

    ``fsdp`` says how the teacher takes part in a sharded run (``train.parallel: fsdp``): ``"shard"``, its
    ``module`` is sharded over the processes like the student; ``"ok"``, it holds no module that needs
    sharding and never reads the student's weights (cached outputs, a server); ``"no"`` (the default), it
    reads or copies the student's weights, which no process holds whole under FSDP.
    """

    fsdp: str = "no"

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        raise NotImplementedError

    def observe(self, batch: Mapping[str, Tensor], student_output: ModelOutput) -> None:
        """Called after the student's forward pass on every micro-batch; most teachers ignore it."""

    def update(self, student: nn.Module, step: int) -> None:
        """Called after every optimizer step; stateless teachers ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load; got keys {sorted(state)}")
