"""A built-in verifiable task: integer arithmetic written as text (``"12+345="`` -> ``"357"``).

Answers are checked exactly, so on-policy methods can score sampled completions without a reward
model, and accuracy on a held-out split measures what a student learned.

Sampling: each problem draws an operator uniformly from ``ops`` and, for each operand independently,
a digit count uniformly from ``digits`` (inclusive) and then a number uniformly among those with that
many digits (1 digit: 0..9; d > 1 digits: 10^(d-1)..10^d - 1). Short operands are therefore as
frequent as long ones. Repeated prompts are redrawn, so every problem appears once; the test problems
are drawn first, then the training ones, so the test split does not depend on the training size.
Subtraction may give negative answers (``"3-12="`` -> ``"-9"``).

``reverse=True`` writes every answer least-significant digit first (``"12+345="`` -> ``"753"``, a
negative answer keeps its sign in front: ``"3-15="`` -> ``"-21"``). A left-to-right model then emits
each digit after the digits whose carries it needs, which makes addition far easier to learn for
small transformers ("Teaching Arithmetic to Small Transformers",
Lee et al., 2023, report reversed answers learned from several times fewer examples than the
plain format).
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Sequence

from pydantic import Field, field_validator, model_validator

from distillery.configbase import StrictModel
from distillery.data.text.jsonl import PromptResponse
from distillery.data.text.tokenizer import EOS

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT = re.compile(r"\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*")


def solve(prompt: str, reverse: bool = False) -> str:
    """The exact answer to an arithmetic prompt such as ``"12+345="`` (digits reversed with ``reverse``).

    Example:
        >>> solve("12+345="), solve("3-12="), solve("7*8="), solve("12+345=", reverse=True)
        ('357', '-9', '56', '753')
    """
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r} (expected like '12+345=')")
    a, op, b = m.groups()
    return _write(OPS[op](int(a), int(b)), reverse)


def _write(value: int, reverse: bool) -> str:
    """``value`` as text; with ``reverse`` its digits least-significant first, the sign kept in front."""
    if not reverse:
        return str(value)
    return ("-" if value < 0 else "") + str(abs(value))[::-1]


def extract_answer(completion: str, eos: str | None = EOS) -> str:
    """The answer part of a completion: up to ``eos`` and the first newline, without surrounding spaces.

    Example:
        >>> extract_answer(" 357<eos><pad>"), extract_answer("357\\n12+1="), extract_answer("\\n357")
        ('357', '357', '')
    """
    if eos:
        completion = completion.split(eos, 1)[0]
    return completion.split("\n", 1)[0].strip()


def verify(prompt: str, completion: str, eos: str | None = EOS, reverse: bool = False) -> bool:
    """Whether ``completion`` answers ``prompt`` exactly (after :func:`extract_answer`), in the plain
    or (``reverse``) the reversed-digit format.

    Example:
        >>> verify("12+345=", "357"), verify("12+345=", " 357\\n"), verify("12+345=", "0357")
        (True, True, False)
        >>> verify("12+345=", "753", reverse=True), verify("12+345=", "357", reverse=True)
        (True, False)
    """
    return extract_answer(completion, eos) == solve(prompt, reverse)


def accuracy(
    prompts: Sequence[str], completions: Sequence[str], eos: str | None = EOS, reverse: bool = False
) -> float:
    """Fraction of completions that :func:`verify` accepts.

    Example:
        >>> accuracy(["1+1=", "2+2="], ["2", "5"])
        0.5
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if len(prompts) == 0:
        raise ValueError("accuracy of an empty set of completions is undefined")
    return sum(verify(p, c, eos, reverse) for p, c in zip(prompts, completions)) / len(prompts)


def _count_with_digits(d: int) -> int:
    return 10 if d == 1 else 9 * 10 ** (d - 1)


class ArithmeticTask:
    """Arithmetic problems, deterministic by seed, with disjoint train and test splits.

    Args:
        digits: ``(min, max)`` digit count of each operand, inclusive.
        ops: operators, from ``+ - *``.
        seed: the problems drawn are a function of the seed alone.
        reverse: write answers least-significant digit first (see the module docstring); the
            problems drawn do not depend on it.

    Example:
        >>> task = ArithmeticTask(digits=(1, 2), ops=("+",), seed=0)
        >>> train, test = task.split(n_train=4, n_test=2)
        >>> [(p.prompt, p.response) for p in test]
        [('15+75=', '90'), ('48+55=', '103')]
        >>> task.verify("15+75=", "90<eos>"), task.accuracy(["48+55="], ["13"])
        (True, 0.0)
    """

    def __init__(
        self,
        digits: tuple[int, int] = (1, 3),
        ops: Sequence[str] = ("+",),
        seed: int = 0,
        reverse: bool = False,
    ) -> None:
        lo, hi = (int(d) for d in digits)
        if not 1 <= lo <= hi:
            raise ValueError(f"digits={tuple(digits)} must satisfy 1 <= min <= max")
        unknown = sorted(set(ops) - set(OPS))
        if unknown or not ops:
            raise ValueError(f"ops={tuple(ops)}: each must be one of {' '.join(OPS)} (at least one)")
        self.digits = (lo, hi)
        self.ops = tuple(dict.fromkeys(ops))
        self.seed = int(seed)
        self.reverse = bool(reverse)

    @property
    def num_problems(self) -> int:
        """How many distinct prompts the task can produce."""
        per_operand = sum(_count_with_digits(d) for d in range(self.digits[0], self.digits[1] + 1))
        return per_operand**2 * len(self.ops)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(*self.digits)
        return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)

    def problems(self, n: int) -> list[PromptResponse]:
        """The first ``n`` distinct problems of this seed's sequence."""
        if n > self.num_problems:
            raise ValueError(
                f"asked for {n} distinct problems but digits={self.digits} and ops={self.ops} "
                f"allow only {self.num_problems}"
            )
        rng = random.Random(self.seed)
        seen: set[str] = set()
        out = []
        while len(out) < n:
            op = self.ops[rng.randrange(len(self.ops))]
            a, b = self._operand(rng), self._operand(rng)
            prompt = f"{a}{op}{b}="
            if prompt in seen:
                continue
            seen.add(prompt)
            out.append(PromptResponse(prompt, _write(OPS[op](a, b), self.reverse)))
        return out

    def split(self, n_train: int, n_test: int) -> tuple[list[PromptResponse], list[PromptResponse]]:
        """``(train, test)``: disjoint; ``test`` is the first ``n_test`` problems, whatever ``n_train``."""
        if n_train < 0 or n_test < 0:
            raise ValueError(f"n_train={n_train} and n_test={n_test} must be >= 0")
        drawn = self.problems(n_test + n_train)
        return drawn[n_test:], drawn[:n_test]

    def verify(self, prompt: str, completion: str, eos: str | None = EOS) -> bool:
        """See :func:`verify` (in this task's answer format)."""
        return verify(prompt, completion, eos, self.reverse)

    def accuracy(self, prompts: Sequence[str], completions: Sequence[str], eos: str | None = EOS) -> float:
        """See :func:`accuracy` (in this task's answer format)."""
        return accuracy(prompts, completions, eos, self.reverse)

    def __repr__(self) -> str:
        rev = ", reverse=True" if self.reverse else ""
        return f"ArithmeticTask(digits={self.digits}, ops={self.ops}, seed={self.seed}{rev})"


class ArithmeticConfig(StrictModel):
    """The arithmetic task of a run and its split sizes."""

    digits: tuple[int, int] = Field((1, 3), description="min and max digits of each operand (inclusive)")
    ops: tuple[str, ...] = Field(("+",), description="operators, from + - *")
    seed: int = Field(0, description="seed of the problem sequence (independent of run seeds)")
    train: int = Field(10_000, ge=1, description="training problems")
    validation: int | float = Field(
        0.01,
        ge=0,
        description="problems carved from the training problems for evaluation during training (the "
        "rest are trained on): a fraction (< 1) of `train` or a count",
    )
    test: int = Field(1_000, ge=1, description="held-out problems (disjoint from training)")
    reverse: bool = Field(
        False,
        description="answers least-significant digit first ('12+345=' -> '753'): far easier for small "
        "models to learn (Lee et al. 2023, 'Teaching Arithmetic to Small Transformers')",
    )

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: tuple[str, ...]) -> tuple[str, ...]:
        bad = sorted(set(ops) - set(OPS))
        if bad or not ops:
            raise ValueError(f"unknown operator(s) {bad}; valid: {' '.join(OPS)} (at least one)")
        return ops

    @model_validator(mode="after")
    def _fits(self) -> ArithmeticConfig:
        lo, hi = self.digits
        if not 1 <= lo <= hi:
            raise ValueError(f"digits={self.digits} must satisfy 1 <= min <= max")
        if isinstance(self.validation, float) and not self.validation < 1.0:
            raise ValueError(
                f"validation={self.validation}: a fraction of `train` must be < 1 (or give a count)"
            )
        if self.train and self.validation_count() >= self.train:
            raise ValueError(
                f"validation={self.validation} problems must be fewer than the train={self.train} problems "
                "they are carved from"
            )
        space = self.build().num_problems
        if self.train + self.test > space:
            raise ValueError(
                f"train + test = {self.train + self.test} exceeds the {space} distinct problems of "
                f"digits={self.digits}, ops={self.ops}"
            )
        return self

    def validation_count(self) -> int:
        """How many of the training problems the validation split takes."""
        if isinstance(self.validation, float):
            return round(self.validation * self.train)
        return self.validation

    def build(self) -> ArithmeticTask:
        return ArithmeticTask(self.digits, self.ops, self.seed, self.reverse)
