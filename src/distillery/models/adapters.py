"""How a model is called on a batch, and which rows of its output the losses see.

An adapter separates *what the model computes* from *what the objective needs*: the loop and the
teachers call ``adapter.forward(model, batch)`` and ``adapter.rows(batch)`` and never look inside the
batch themselves, so the same loop serves classifiers and (later) language models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# Feature names of a causal LM's output when its logits are left to the loss (chunked over tokens):
# the final hidden states aligned with the rows, and the LM head that turns them into logits.
LM_HIDDEN = "lm_hidden"
LM_HEAD_WEIGHT = "lm_head_weight"
LM_HEAD_BIAS = "lm_head_bias"
# Feature names of a sparse teacher's output (a top-k or sampled cache, distillery.cache): per row,
# the k kept ids, the teacher's log-probabilities at them, and the tail mass outside them (top-k) or
# each id's share of the draws (sampled).
TEACHER_IDS = "teacher_ids"
TEACHER_LOGP = "teacher_logp"
TEACHER_TAIL = "teacher_tail"
TEACHER_WEIGHTS = "teacher_weights"
# Feature name of the hints that multi-exit students output and their deepest-exit teacher matches.
HINT_FEATURE = "hint"
# Optional batch key: one weight per example ``[B]`` (PACED); the loop turns it into per-row weights.
ROW_WEIGHT_KEY = "row_weight"
# Optional feature of a teacher's output: per-row weights with the rows' shape (or a prefix of it), which
# the objective multiplies into the row weights of the terms that use the teacher (a multi-teacher's
# agreement filter gives 0 on the rows its members disagree on, distillery.teachers.multi).
TEACHER_ROW_WEIGHT = "teacher_row_weight"


@dataclass
class ModelOutput:
    """What a model (student or teacher) produced for a batch.

    ``logits`` is ``[..., C]`` with leading dims matching the rows of :meth:`ClassifierAdapter.rows`;
    ``features`` holds named intermediate tensors for feature-level losses. A causal LM whose loss is
    chunked over tokens returns ``logits=None`` and the features ``LM_HIDDEN`` ``[..., H]``,
    ``LM_HEAD_WEIGHT`` ``[V, H]`` (and ``LM_HEAD_BIAS`` ``[V]`` when its head has a bias).
    """

    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)


class ClassifierAdapter:
    """Batches ``{"x": inputs, "y": labels (-100 = unlabelled), "index": sample ids}``; one row per sample.

    For a model that returns a tensor of logits (``model(x) -> [B, C]``). A Hugging Face model
    (``AutoModelForSequenceClassification``, ``AutoModelForCausalLM``) takes the adapters of
    :mod:`distillery.models.hf` instead, which read ``input_ids``, ``attention_mask`` and ``labels``.
    """

    input_key = "x"
    target_key = "y"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch keys this adapter reads (the loop checks them once, at the first batch)."""
        return (self.input_key, self.target_key)

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(target [B], mask [B])``: every sample is a valid row; unlabelled ones have target -100."""
        target = batch[self.target_key]
        return target, torch.ones_like(target, dtype=torch.bool)

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        return ModelOutput(logits=_logits_tensor(model(batch[self.input_key]), self))

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch[self.input_key].shape[0])


def _logits_tensor(out, adapter) -> Tensor:
    """``out`` if it is a tensor; a model output object (a Hugging Face model's) is a clear error."""
    if isinstance(out, Tensor):
        return out
    hint = ""
    if hasattr(out, "logits"):
        hint = (
            "; it looks like a Hugging Face model: use adapter=HFSequenceClassifierAdapter() (a sequence "
            "classifier) or HFCausalLMAdapter() (a causal LM) from distillery.models.hf, with batches of "
            "input_ids, attention_mask and labels"
        )
    raise TypeError(
        f"{type(adapter).__name__} calls model(batch[{adapter.input_key!r}]) and expects a tensor of logits, "
        f"but the model returned a {type(out).__name__}{hint}"
    )


class StackedClassifierAdapter(ClassifierAdapter):
    """For models that return ``[M, B, C]``: M predictions per sample (exits of one network, or peers).

    Every one of the M outputs is a row of its own for the losses: targets and masks are repeated
    over the leading M axis, so ``ce`` trains every exit/peer on the labels and a divergence compares
    each of them with its teacher row.
    """

    def __init__(self, members: int) -> None:
        self.members = members

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        target, mask = super().rows(batch)
        m = self.members
        return target.unsqueeze(0).expand(m, -1), mask.unsqueeze(0).expand(m, -1)  # (M, B)

    def row_weight(self, weight: Tensor) -> Tensor:
        """Per-example weights ``[B]`` repeated for each of the M outputs: ``[M, B]``."""
        return weight.unsqueeze(0).expand(self.members, -1)
