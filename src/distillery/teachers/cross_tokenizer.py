"""A frozen teacher LM with another tokenizer than the student's, run on the text of the student's rows.

A student batch holds the student's token ids. :class:`CrossTokenizerTeacher` reads each row back as
text (byte offsets per student token), tokenizes the same text with the teacher's tokenizer, runs
the teacher on it and returns what the two cross-tokenizer families need
(:mod:`distillery.data.text.cross_tokenizer` has the layout and how the offsets are recovered):

* ULD ("Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"): the
  teacher's next-token log-probabilities, the k-th learned teacher target's placed at the position of
  the k-th learned student target (the pairing of the authors' code, which cuts to the shorter
  response), with a mask of the positions that have a partner.
* Span likelihoods ("Cross-Tokenizer Distillation via Approximate Likelihood Matching"): the
  teacher's log-probability of each of its actual next tokens, and per-position span ids of both
  sides over the learned text, from :func:`~distillery.data.text.alignment.aligned_spans`.

The output has no ``logits`` (the two vocabularies do not match id by id, so no same-tokenizer term
can use them); every tensor is ``[B, ...]`` over the student's rows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distillery.data.text.cross_tokenizer import (
    CROSS_TOKENIZER_FEATURES,
    NUM_SPANS,
    STUDENT_SPAN,
    TEACHER_SPAN,
    TEACHER_TOKEN_LOGP,
    ULD_MASK,
    ULD_TEACHER_LOGP,
    AlignedBatch,
    CrossTokenizerAligner,
)
from distillery.models.adapters import ModelOutput
from distillery.models.hf import HFCausalLMAdapter
from distillery.teachers.base import BaseTeacher, TeacherOutput
from distillery.teachers.frozen import FrozenTeacher

OUTPUTS = ("uld", "span")


class CrossTokenizerTeacher(BaseTeacher):
    r"""A frozen causal LM reading the student's texts through its own tokenizer.

    Args:
        module: the teacher (an ``AutoModelForCausalLM``-like module called as
            ``module(input_ids=, attention_mask=)``). Put in ``eval()`` mode, frozen and (unless
            ``keep_dtype``) cast to float32, as :class:`~distillery.teachers.FrozenTeacher` does.
        teacher_tokenizer: the teacher's (fast) tokenizer.
        student_tokenizer: the tokenizer of the batches' ``input_ids``.
        max_length: the teacher's longest row (None: unlimited); longer rows lose their last tokens.
        add_bos: the teacher row's ``<bos>``: None mirrors the student's row, True always, False never.
        outputs: which features to compute: ``"uld"`` (:data:`ULD_TEACHER_LOGP`, :data:`ULD_MASK`; the
            larger, ``[B, T-1, V_t]``) and/or ``"span"`` (:data:`TEACHER_TOKEN_LOGP`,
            :data:`TEACHER_SPAN`, :data:`STUDENT_SPAN`, :data:`NUM_SPANS`).
        keep_dtype: keep the module's dtype; the features are float32 all the same.

    Called on a student LM batch (``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, right
    padded), it returns ``TeacherOutput(logits=None, features=...)``:

    * ``ULD_TEACHER_LOGP`` ``[B, T-1, V_t]``: the teacher's log-softmax at its k-th learned target,
      placed at the student's position of its k-th learned target; 0 elsewhere.
    * ``ULD_MASK`` ``[B, T-1]``: bool, the positions filled (k below both sides' counts).
    * ``TEACHER_TOKEN_LOGP`` ``[B, T'-1]``: :math:`\log p_T` of the teacher's actual next token at each
      of its positions; 0 on padding.
    * ``TEACHER_SPAN`` ``[B, T'-1]`` and ``STUDENT_SPAN`` ``[B, T-1]``: the span id of the token each
      position predicts, or -1 (shifted like the logits).
    * ``NUM_SPANS`` ``[B]``: each row's number of spans.

    ``calls`` counts the teacher's forwards (one per batch); :attr:`last` keeps the latest batch's
    alignment (the teacher rows, their offsets and spans) for inspection.

    Example:
        >>> from distillery.data.text.tokenizer import train_tokenizer
        >>> byte = train_tokenizer("", kind="byte", use_cache=False)
        >>> bpe = train_tokenizer("a cat sat. " * 8, 270, use_cache=False)
        >>> class Toy(nn.Module):  # log-probabilities of a uniform distribution over 270 ids
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return type("O", (), {"logits": torch.zeros(*input_ids.shape, 270)})()
        >>> teacher = CrossTokenizerTeacher(Toy(), bpe, byte)
        >>> ids = [1, *byte("a cat", add_special_tokens=False)["input_ids"], 2]
        >>> batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, 7, dtype=torch.long),
        ...          "labels": torch.tensor([[-100, -100, -100, *ids[3:]]])}  # learned: "cat<eos>"
        >>> out = teacher(batch)
        >>> teacher.last.teacher_batch["input_ids"].tolist(), out.features[NUM_SPANS].tolist()
        ([[1, 67, 223, 260, 2]], [1])
        >>> out.features[STUDENT_SPAN].tolist(), out.features[TEACHER_SPAN].tolist()
        ([[-1, -1, 0, 0, 0, -1]], [[-1, -1, 0, -1]])
        >>> out.features[ULD_MASK].int().tolist()  # 4 learned student targets, 2 learned teacher ones
        [[0, 0, 1, 1, 0, 0]]
    """

    def __init__(
        self,
        module: nn.Module,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        max_length: int | None = None,
        add_bos: bool | None = None,
        outputs: Collection[str] = OUTPUTS,
        keep_dtype: bool = False,
    ) -> None:
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown or not outputs:
            raise ValueError(
                f"outputs must be a non-empty subset of {', '.join(OUTPUTS)}; got {sorted(outputs)}"
            )
        self.adapter = HFCausalLMAdapter()  # the student batch's keys, which the loop checks
        self.inner = FrozenTeacher(module, HFCausalLMAdapter(), keep_dtype=keep_dtype)
        self.aligner = CrossTokenizerAligner(
            student_tokenizer, teacher_tokenizer, add_bos=add_bos, max_length=max_length
        )
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.outputs = frozenset(outputs)
        self.calls = 0
        self.last: AlignedBatch | None = None

    @property
    def module(self) -> nn.Module:
        return self.inner.module

    def __call__(
        self, batch: Mapping[str, Tensor], student_output: ModelOutput | None = None
    ) -> TeacherOutput:
        aligned = self.aligner(batch)
        self.last = aligned
        t_batch = aligned.teacher_batch
        out = self.inner({"input_ids": t_batch["input_ids"], "attention_mask": t_batch["attention_mask"]})
        self.calls += 1
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T'-1, V_t)
        real = t_batch["attention_mask"][:, 1:].bool()  # (B, T'-1): positions predicting a real token
        features: dict[str, Tensor] = {}
        if "uld" in self.outputs:
            source = aligned.uld_source  # (B, T-1)
            keep = source >= 0
            index = source.clamp_min(0).unsqueeze(-1).expand(-1, -1, logp.shape[-1])
            gathered = logp.gather(1, index)  # (B, T-1, V_t)
            features[ULD_TEACHER_LOGP] = torch.where(
                keep.unsqueeze(-1), gathered, torch.zeros((), dtype=logp.dtype)
            )
            features[ULD_MASK] = keep
        if "span" in self.outputs:
            nxt = t_batch["input_ids"][:, 1:].unsqueeze(-1)
            token_logp = logp.gather(-1, nxt).squeeze(-1)  # (B, T'-1)
            features[TEACHER_TOKEN_LOGP] = torch.where(real, token_logp, torch.zeros((), dtype=logp.dtype))
            features[TEACHER_SPAN] = aligned.teacher_span
            features[STUDENT_SPAN] = aligned.student_span
            features[NUM_SPANS] = aligned.num_spans
        return TeacherOutput(logits=None, features=features)

    def to(self, device: torch.device | str) -> CrossTokenizerTeacher:
        self.inner.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0)) if state else 0


__all__ = [
    "CROSS_TOKENIZER_FEATURES",
    "NUM_SPANS",
    "OUTPUTS",
    "STUDENT_SPAN",
    "TEACHER_SPAN",
    "TEACHER_TOKEN_LOGP",
    "ULD_MASK",
    "ULD_TEACHER_LOGP",
    "CrossTokenizerTeacher",
]
