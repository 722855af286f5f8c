"""PS-KD: the student's own predictions from the previous epoch, mixed with the labels."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distillery.models.adapters import ModelOutput
from distillery.teachers.base import BaseTeacher, TeacherOutput


class PastPredictionsTeacher(BaseTeacher):
    r"""Progressive self-knowledge distillation ("Self-Knowledge Distillation with Progressive
    Refinement of Targets", Kim et al., ICCV 2021).

    The target of sample :math:`i` in epoch :math:`t` (0-based, of :math:`T`) is

    .. math::

        q_i^{(t)} = (1 - \alpha_t)\, \mathrm{onehot}(y_i) + \alpha_t\, p_i^{(t-1)},
        \qquad \alpha_t = \alpha_T \min\!\Big(\frac{t + 1}{T}, 1\Big)

    where :math:`p_i^{(t-1)}` is the student's softmax on sample :math:`i` the last time it was seen,
    which with epoch-wise shuffling is the previous epoch. The teacher returns :math:`\log q` as
    logits, so ``forward_kl`` at T=1 on them is PS-KD's soft-target cross-entropy up to a constant.
    Samples never seen (so every sample in the first epoch) get the one-hot label.

    The schedule follows the official code (github.com/lgcnsai/PS-KD-Pytorch, ``main.py``,
    ``main_worker``: ``alpha_t = alpha_T * ((epoch + 1) / end_epoch)`` with 0-based epochs), so
    :math:`\alpha_T` is reached in the last epoch; it is capped at :math:`\alpha_T` should a run go on
    past :math:`T` epochs. In epoch 0 the official ``train`` first overwrites the stored predictions
    of each batch with its one-hot labels, so its target is the one-hot label although
    :math:`\alpha_0 = \alpha_T / T > 0`; the rule here for samples never seen gives the same targets
    (the official loader keeps every sample in epoch 0, so none is unseen afterwards there).

    Predictions are stored per sample id (``batch["index"]``, which the data pipeline provides and
    which follows each example through shuffling) in a ``[num_ids, C]`` float16 table on the CPU:
    memory is ``2 * num_ids * C`` bytes (60,000 x 10 classes: 1.2 MB). Under data parallelism the
    processes exchange their rows so every process holds the whole table.

    Args:
        num_ids: one more than the largest sample id.
        num_classes: C.
        alpha_T: final weight :math:`\alpha_T` of the past predictions (the paper uses 0.8).
        steps_per_epoch: optimizer steps per pass over the training set (``N / batch_size``).
        total_epochs: :math:`T`, the number of epochs of the run.
    """

    def __init__(
        self, num_ids: int, num_classes: int, alpha_T: float, steps_per_epoch: float, total_epochs: float
    ) -> None:
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"alpha_T must be in [0, 1]; got {alpha_T}")
        self.table = torch.zeros(num_ids, num_classes, dtype=torch.float16)
        self.seen = torch.zeros(num_ids, dtype=torch.bool)
        self.alpha_T = alpha_T
        self.steps_per_epoch = steps_per_epoch
        self.total_epochs = max(total_epochs, 1e-9)
        self.step = 0

    @property
    def epoch(self) -> int:
        return math.floor(self.step / self.steps_per_epoch + 1e-9)

    @property
    def alpha(self) -> float:
        """alpha_t of the current (0-based) epoch t: alpha_T * (t + 1) / T, at most alpha_T."""
        return self.alpha_T * min((self.epoch + 1) / self.total_epochs, 1.0)

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        ids, y = batch["index"].cpu(), batch["y"]
        if bool((y < 0).any()):
            raise ValueError(
                "past_predictions (PS-KD) needs a label on every training row; this batch has unlabelled "
                "rows (set data.transfer=0)"
            )
        num_classes = self.table.shape[1]
        onehot = torch.nn.functional.one_hot(y.long(), num_classes).float()
        past = self.table[ids].float().to(y.device)
        alpha = torch.where(self.seen[ids].to(y.device), self.alpha, 0.0).unsqueeze(-1)
        target = (1.0 - alpha) * onehot + alpha * past  # (B, C), rows sum to 1
        return TeacherOutput(logits=torch.log(target))  # -inf where the target has no mass

    def observe(self, batch: Mapping[str, Tensor], student_output: ModelOutput) -> None:
        ids = batch["index"]
        probs = torch.softmax(student_output.logits.detach().float(), dim=-1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids_all = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
            probs_all = [torch.empty_like(probs) for _ in range(dist.get_world_size())]
            dist.all_gather(ids_all, ids.contiguous())
            dist.all_gather(probs_all, probs.contiguous())
            ids, probs = torch.cat(ids_all), torch.cat(probs_all)
        ids = ids.cpu()
        self.table[ids] = probs.cpu().to(torch.float16)
        self.seen[ids] = True

    def update(self, student, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.clone(), "seen": self.seen.clone(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.table.copy_(state["table"])
            self.seen.copy_(state["seen"])
            self.step = int(state["step"])
