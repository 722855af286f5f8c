"""Loss terms over class (or token) logits: thin modules over :mod:`distillery.functional`.

Every term here honours per-row weights (:attr:`~distillery.losses.base.LossInputs.row_weight`): it
then evaluates its function with ``reduction="none"`` and returns the weighted sum over its rows
divided by the same global row count as without weights. Without weights the function's own
``"mean"`` is used, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from distillery import functional as DF
from distillery.functional.importance import sampled_logp
from distillery.functional.kd import kd_loss_parts
from distillery.losses.base import IGNORE_INDEX, LossInputs, LossTerm, TermConfig, labelled_rows


class CrossEntropyConfig(TermConfig):
    """Cross-entropy with the hard labels, averaged over labelled rows."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class CrossEntropyLoss(LossTerm):
    """Supervised cross-entropy; unlabelled rows (transfer set) do not count."""

    needs_teacher: ClassVar[bool] = False
    supports_row_weight: ClassVar[bool] = True
    supports_hidden: ClassVar[bool] = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        if inputs.student_logits is None:  # chunked over tokens from hidden states and the LM head
            kw = self._from_hidden(inputs, teacher=False)
            return DF.chunked_cross_entropy_from_hidden(
                kw["student_hidden"],
                kw["student_head_weight"],
                inputs.target,
                head_bias=kw["student_head_bias"],
                mask=inputs.mask,
                num_valid=num_valid,
                ignore_index=IGNORE_INDEX,
                label_smoothing=self.label_smoothing,
                chunk_size=self.chunk_size,
            )
        weighted = inputs.row_weight is not None
        value = DF.cross_entropy(
            inputs.student_logits,
            inputs.target,
            mask=inputs.mask,
            reduction="none" if weighted else "mean",
            num_valid=num_valid,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )
        if not weighted:
            return value
        return self._weighted(value, inputs, self.rows(inputs.target, inputs.mask), num_valid)


class ForwardKLConfig(TermConfig):
    """T^2 * KL(teacher || student) at temperature T, averaged over all valid rows."""

    name: Literal["forward_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    vocab_size: int | None = Field(None, ge=1, description="compare only the first vocab_size classes")


class ForwardKLLoss(LossTerm):
    supports_row_weight: ClassVar[bool] = True
    supports_hidden: ClassVar[bool] = True
    sparse_name: ClassVar[str | None] = "forward_kl"

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.vocab_size = vocab_size

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        sparse = self._sparse_teacher(inputs, num_valid, self.temperature)
        if sparse is not None:  # a top-k or sampled teacher cache
            return sparse
        if inputs.student_logits is None:  # chunked over tokens from hidden states and the LM heads
            return DF.chunked_kd_from_hidden(
                **self._from_hidden(inputs, teacher=True),
                divergence="forward_kl",
                temperature=self.temperature,
                vocab_size=self.vocab_size,
                mask=inputs.mask,
                num_valid=num_valid,
                chunk_size=self.chunk_size,
            )
        weighted = inputs.row_weight is not None
        value = DF.forward_kl(
            inputs.student_logits,
            self._teacher_logits(inputs),
            self.temperature,
            mask=inputs.mask,
            reduction="none" if weighted else "mean",
            num_valid=num_valid,
            vocab_size=self.vocab_size,
        )
        return self._weighted(value, inputs, inputs.mask, num_valid) if weighted else value


class KDConfig(TermConfig):
    """Hinton's KD: alpha * T^2 * KL averaged over the valid rows plus (1 - alpha) * CE averaged over
    the labelled rows only (PyTorch's ``ignore_index`` convention)."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0.0, description="student temperature (and teacher's by default)")
    alpha: float = Field(
        0.9, description="weight of the KL part; may exceed 1 (self-distillation under noise)"
    )
    teacher_temperature: float | None = Field(None, gt=0.0, description="separate teacher temperature (LTD)")
    vocab_size: int | None = Field(None, ge=1)


class KDLoss(LossTerm):
    """:func:`distillery.functional.kd_loss`: its KL part is divided by the step's valid rows and its
    cross-entropy part by the step's labelled rows, so the term has two counts (``num_valid`` is the
    pair ``[valid rows, labelled rows]``, as :meth:`counts` gives it); a masked row counts in neither.
    """

    supports_row_weight: ClassVar[bool] = True
    num_counts: ClassVar[int] = 2

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_temperature: float | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_temperature = teacher_temperature
        self.vocab_size = vocab_size

    def counts(self, target: Tensor, mask: Tensor) -> Tensor:
        """``[2]`` float64: the valid rows (KL part) and the labelled valid rows (cross-entropy part)."""
        return torch.stack([mask.sum(), labelled_rows(target, mask).sum()]).to(torch.float64)

    @staticmethod
    def _split(num_valid: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if num_valid is None:
            return None, None
        if not isinstance(num_valid, Tensor) or num_valid.shape != (2,):
            raise ValueError(
                "the kd term is normalised by two counts, num_valid=[valid rows, labelled rows] (see "
                f"KDLoss.counts); got {num_valid!r}"
            )
        return num_valid[0], num_valid[1]

    def forward(self, inputs: LossInputs, num_valid: Tensor | None = None) -> Tensor:
        n_valid, n_labelled = self._split(num_valid)
        args = (
            inputs.student_logits,
            self._teacher_logits(inputs),
            inputs.target,
            self.temperature,
            self.alpha,
        )
        kw = {
            "teacher_temperature": self.teacher_temperature,
            "mask": inputs.mask,
            "ignore_index": IGNORE_INDEX,
            "vocab_size": self.vocab_size,
        }
        if inputs.row_weight is None:
            return DF.kd_loss(*args, **kw, num_valid=n_valid, num_labelled=n_labelled)
        distill, label = kd_loss_parts(*args, **kw)
        labelled = labelled_rows(inputs.target, inputs.mask)
        return self._weighted(distill, inputs, inputs.mask, n_valid) + self._weighted(
            label, inputs, labelled, n_labelled
        )


# ----------------------------------------------------------------------------------------------------
# The rest of the logit family: each term calls one function of distillery.functional with the
# hyperparameters of its config, over every valid row (or, for dkd/nkd, every labelled row).
# ----------------------------------------------------------------------------------------------------


class _FunctionalTerm(LossTerm):
    """Calls ``function(student_logits, teacher_logits, [target,] **hyperparameters)``.

    Terms that need a label (``uses_target``) skip unlabelled rows, or with ``unlabelled="teacher"``
    take the teacher's top-1 class as the target of those rows (so that an unlabelled transfer set
    still counts).
    """

    function: ClassVar[Callable[..., Tensor]]
    uses_target: ClassVar[bool] = False
    supports_row_weight: ClassVar[bool] = True
    # name of the divergence in distillery.functional.chunked.DIVERGENCES, for the chunked loss;
    # a subclass that names one supports hidden-state inputs
    chunk_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.supports_hidden = cls.chunk_name is not None

    def __init__(self, unlabelled: str = "skip", **hyperparameters: Any) -> None:
        super().__init__()
        if unlabelled not in UNLABELLED_POLICIES:
            raise ValueError(
                f"unlabelled must be one of {', '.join(UNLABELLED_POLICIES)}; got {unlabelled!r}"
            )
        self.unlabelled = unlabelled
        self.hyperparameters = hyperparameters

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        if self.uses_target and self.unlabelled == "skip":
            return labelled_rows(target, mask)
        return mask

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        if self.sparse_name is not None:
            beta = {"beta": self.hyperparameters["beta"]} if "beta" in self.hyperparameters else {}
            sparse = self._sparse_teacher(inputs, num_valid, self.hyperparameters["temperature"], **beta)
            if sparse is not None:  # a top-k or sampled teacher cache
                return sparse
        if inputs.student_logits is None:  # chunked over tokens from hidden states and the LM heads
            return DF.chunked_kd_from_hidden(
                **self._from_hidden(inputs, teacher=True),
                divergence=self.chunk_name,
                mask=inputs.mask,
                num_valid=num_valid,
                chunk_size=self.chunk_size,
                **self.hyperparameters,
            )
        fn = type(self).function
        teacher = self._teacher_logits(inputs)
        args: tuple[Tensor, ...] = (inputs.student_logits, teacher)
        mask, extra = inputs.mask, {}
        if self.uses_target:
            target = inputs.target
            if self.unlabelled == "teacher":
                target = torch.where(target == IGNORE_INDEX, teacher.argmax(-1), target)
            mask = self.rows(target, inputs.mask)
            args, extra = (*args, target), {"ignore_index": IGNORE_INDEX}
        if inputs.row_weight is None:
            return fn(*args, mask=mask, num_valid=num_valid, **extra, **self.hyperparameters)
        per_row = fn(*args, mask=mask, reduction="none", **extra, **self.hyperparameters)
        return self._weighted(per_row, inputs, mask, num_valid)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{k}={v}" for k, v in {"unlabelled": self.unlabelled, **self.hyperparameters}.items()
        )


UNLABELLED_POLICIES = ("skip", "teacher")
_UNLABELLED = Field(
    "skip", description="rows without a label: skip them, or use the teacher's top-1 class as the target"
)


_TEMPERATURE = Field(
    1.0, gt=0.0, description="softening temperature T of both sides (the value is scaled by T^2)"
)
_VOCAB = Field(None, ge=1, description="compare only the first vocab_size classes (padded vocabularies)")


class ReverseKLConfig(TermConfig):
    """T^2 * KL(student || teacher): mode-seeking."""

    name: Literal["reverse_kl"] = "reverse_kl"
    temperature: float = _TEMPERATURE
    vocab_size: int | None = _VOCAB


class ReverseKLLoss(_FunctionalTerm):
    function = staticmethod(DF.reverse_kl)
    chunk_name = "reverse_kl"
    sparse_name = "reverse_kl"

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__(temperature=temperature, vocab_size=vocab_size)


class JSDConfig(TermConfig):
    """GKD's generalized Jensen-Shannon divergence JSD(beta): 0 = forward KL, 1 = reverse KL."""

    name: Literal["jsd"] = "jsd"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="mixture weight of the teacher")
    temperature: float = _TEMPERATURE
    vocab_size: int | None = _VOCAB


class JSDLoss(_FunctionalTerm):
    function = staticmethod(DF.generalized_jsd)
    chunk_name = "jsd"
    sparse_name = "jsd"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__(beta=beta, temperature=temperature, vocab_size=vocab_size)


class ImportanceReverseKLConfig(TermConfig):
    """Skill-SD's importance-weighted reverse KL at the sampled (or given) tokens, gradient-correct."""

    name: Literal["importance_reverse_kl"] = "importance_reverse_kl"
    estimator: Literal["k3", "k1"] = Field("k3", description="k3: e^-l - 1 + l (default); k1: l")
    clip: float | None = Field(2.0, gt=0.0, description="cap on the importance ratio's value (null: none)")
    behaviour_temperature: float = Field(
        1.0,
        gt=0.0,
        description="the temperature the tokens were sampled at (method.temperature): the behaviour policy is the "
        "student's own distribution at this temperature, detached",
    )
    vocab_size: int | None = _VOCAB


class ImportanceReverseKLLoss(LossTerm):
    """:func:`distillery.functional.importance_weighted_reverse_kl` over the rows' target tokens.

    The tokens are the batch's targets (the sampled responses of an on-policy batch); the behaviour
    policy is the student's own distribution at ``behaviour_temperature``, detached, which is the
    policy that sampled them when the batch was sampled by the current student just before this
    step (the ratio's value is then 1, its gradient the score-function term).
    """

    needs_teacher = True
    supports_row_weight = True

    def __init__(
        self, estimator: str = "k3", clip: float | None = 2.0, behaviour_temperature: float = 1.0,
        vocab_size: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.estimator, self.clip, self.behaviour_temperature = estimator, clip, behaviour_temperature
        self.vocab_size = vocab_size

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        if inputs.student_logits is None:
            raise ValueError(
                "importance_reverse_kl needs the student's logits; turn the chunked loss off (chunked_loss.enabled=false)"
            )
        student, teacher = inputs.student_logits, self._teacher_logits(inputs)
        if self.vocab_size is not None:
            student, teacher = student[..., : self.vocab_size], teacher[..., : self.vocab_size]
        rows = self.rows(inputs.target, inputs.mask)
        tokens = inputs.target.clamp_min(0)
        behaviour = sampled_logp(student, tokens, self.behaviour_temperature)
        common = {"estimator": self.estimator, "clip": self.clip, "mask": rows}
        if inputs.row_weight is not None:  # PACED: sum_i w_i loss_i / num_valid
            per_row = DF.importance_weighted_reverse_kl(
                student, teacher, tokens, behaviour, reduction="none", **common
            )
            return self._weighted(per_row, inputs, rows, num_valid)
        return DF.importance_weighted_reverse_kl(
            student, teacher, tokens, behaviour, num_valid=num_valid, **common
        )


class TVDConfig(TermConfig):
    """Total variation distance 0.5 * sum |p_t - p_s|, scaled by T^2."""

    name: Literal["tvd"] = "tvd"
    temperature: float = _TEMPERATURE
    vocab_size: int | None = _VOCAB


class TVDLoss(_FunctionalTerm):
    function = staticmethod(DF.total_variation)
    chunk_name = "tvd"

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__(temperature=temperature, vocab_size=vocab_size)


class SkewKLConfig(TermConfig):
    """DistiLLM's skew KL: KL(p_t || alpha p_t + (1 - alpha) p_s)."""

    name: Literal["skew_kl"] = "skew_kl"
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="weight of the teacher in the mixture")
    temperature: float = _TEMPERATURE
    vocab_size: int | None = _VOCAB


class SkewKLLoss(_FunctionalTerm):
    function = staticmethod(DF.skew_kl)
    chunk_name = "skew_kl"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__(alpha=alpha, temperature=temperature, vocab_size=vocab_size)


class SkewReverseKLConfig(TermConfig):
    """DistiLLM's skew reverse KL: KL(p_s || alpha p_s + (1 - alpha) p_t)."""

    name: Literal["skew_reverse_kl"] = "skew_reverse_kl"
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="weight of the student in the mixture")
    temperature: float = _TEMPERATURE
    vocab_size: int | None = _VOCAB


class SkewReverseKLLoss(_FunctionalTerm):
    function = staticmethod(DF.skew_reverse_kl)
    chunk_name = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, vocab_size: int | None = None) -> None:
        super().__init__(alpha=alpha, temperature=temperature, vocab_size=vocab_size)


class DKDConfig(TermConfig):
    """Decoupled KD: alpha * TCKD + beta * NCKD (T^2-scaled), on labelled rows.

    The paper ramps the term's weight linearly over the first 20 of 240 epochs: set
    ``warmup_epochs`` for that.
    """

    name: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0.0, description="weight of the target-class part (TCKD)")
    beta: float = Field(8.0, ge=0.0, description="weight of the non-target-class part (NCKD)")
    temperature: float = Field(4.0, gt=0.0)
    unlabelled: Literal["skip", "teacher"] = _UNLABELLED
    vocab_size: int | None = _VOCAB


class DKDLoss(_FunctionalTerm):
    function = staticmethod(DF.dkd_loss)
    uses_target = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        unlabelled: str = "skip",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(unlabelled, alpha=alpha, beta=beta, temperature=temperature, vocab_size=vocab_size)


class NKDConfig(TermConfig):
    """Normalized KD: target part at T=1 plus gamma * T^2 * normalised non-target CE, on labelled rows."""

    name: Literal["nkd"] = "nkd"
    temperature: float = Field(1.0, gt=0.0)
    gamma: float = Field(1.5, ge=0.0, description="weight of the non-target part")
    unlabelled: Literal["skip", "teacher"] = _UNLABELLED
    vocab_size: int | None = _VOCAB


class NKDLoss(_FunctionalTerm):
    function = staticmethod(DF.nkd_loss)
    uses_target = True

    def __init__(
        self,
        temperature: float = 1.0,
        gamma: float = 1.5,
        unlabelled: str = "skip",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(unlabelled, temperature=temperature, gamma=gamma, vocab_size=vocab_size)


class USKDConfig(TermConfig):
    """USKD: teacher-free self-distillation with the student's own customised soft labels."""

    name: Literal["uskd"] = "uskd"
    alpha: float = Field(1.0, ge=0.0, description="weight of the normalised target term")
    beta: float = Field(0.1, ge=0.0, description="weight of the Zipf non-target term")


class USKDLoss(LossTerm):
    """USKD on labelled rows; needs no teacher (the soft labels come from the student, detached)."""

    needs_teacher: ClassVar[bool] = False
    supports_row_weight: ClassVar[bool] = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.1) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def rows(self, target: Tensor, mask: Tensor) -> Tensor:
        return labelled_rows(target, mask)

    def forward(self, inputs: LossInputs, num_valid: Tensor | float | None = None) -> Tensor:
        weighted = inputs.row_weight is not None
        value = DF.uskd_loss(
            inputs.student_logits,
            inputs.target,
            self.alpha,
            self.beta,
            mask=inputs.mask,
            reduction="none" if weighted else "mean",
            num_valid=num_valid,
            ignore_index=IGNORE_INDEX,
        )
        if not weighted:
            return value
        return self._weighted(value, inputs, self.rows(inputs.target, inputs.mask), num_valid)
