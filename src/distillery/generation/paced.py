"""PACED: weight each problem's distillation loss by the student's pass rate on it.

"PACED: Distillation at the Frontier of Student Competence" concentrates distillation on the problems
at the edge of what the student can do. For every problem (prompt) ``x`` of a batch the student
samples ``n`` answers; a verifier checks them; the pass rate ``p(x)`` is the share accepted, and the
problem's loss is scaled by the Beta kernel ``w(p) = p^a (1-p)^b``
(:func:`~distillery.functional.paced.paced_weights`, normalised to a maximum of 1 by default):

.. math::

    \\mathcal{L}(\\theta) = \\frac{1}{N} \\sum_{x \\in \\text{batch}} w\\big(p(x)\\big)
        \\sum_{t \\in \\text{response}(x)} D\\big(p_T(\\cdot|y_{<t}, x) \\,\\|\\, p_S^\\theta(\\cdot|y_{<t}, x)\\big)

with ``N`` the number of response tokens of the global batch, as for unweighted token-level KD.
Problems the student always solves (``p = 1``) or never solves (``p = 0``) get no weight. Sampling
needs no gradient and no teacher; the training tokens (the batch's responses) are left as they are.

:class:`PacedBatches` is that step as a batch transform of the training loop,
``transform(batch, student, step) -> batch``: it returns a copy of the batch with ``row_weight [B]``,
which the loop spreads over each row's tokens. Pass rates are estimated from samples seeded by
``(seed, step, batch contents)``. With ``every > 1`` a problem's pass rate is reused for up to that
many steps (a cache keyed by the prompt's tokens, kept in memory: a resumed run starts with an empty
cache, so only ``every = 1`` resumes bit for bit).

Chaining it before :class:`~distillery.generation.OnPolicyBatches` also works (the weights are per
row and are carried over to sampled responses), but the LM runner wires only the fixed responses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.functional.paced import paced_weights
from distillery.generation.sampling import (
    as_module,
    generate_completions,
    mix_seed,
    special_token_ids,
    split_prompts,
    tensor_digest,
)
from distillery.models.adapters import ROW_WEIGHT_KEY


class PacedBatches:
    """PACED's weighting step: ``row_weight = paced_weights(pass rate)`` for every prompt of a batch.

    For a prompt/response batch, each prompt (``[bos] prompt``, :func:`split_prompts`) is repeated
    ``samples`` times and the student continues all of them in one batched, seeded
    :func:`generate_completions` call (temperature ``temperature``, no gradient, ``eval()`` mode,
    restored afterwards). Prompts and completions are decoded with ``tokenizer`` (prompts without
    special tokens, completions with them, so that a verifier can cut at ``<eos>``), each completion is
    checked with ``verify(prompt_text, completion_text)``, and the pass rate ``p`` of a prompt is the
    share of its ``samples`` completions accepted. The returned batch is a shallow copy of the input
    with ``row_weight = paced_weights(p, a, b, normalize)`` (``[B]``, float32, the batch's device);
    every other entry is the same tensor object.

    Problems whose answer is judged against a per-example reference (the user's data) pass
    ``score_example(index, completion_ids) -> float`` instead: it is called with each row's sample id
    (the batch's ``index``) and the completion's token ids (cut after the first ``<eos>``, kept), and
    returns a score in ``[0, 1]``; the pass rate is the mean score, and a row's rate is cached by its
    sample id rather than its prompt (two examples may share a prompt but not a reference).

    Args:
        verify: ``verify(prompt, completion) -> bool``, e.g. the arithmetic task's
            ``functools.partial(distillery.data.text.arithmetic.verify, eos=tokenizer.eos_token)``
            (None when ``score_example`` is given).
        tokenizer: decodes token ids (``tokenizer.decode(ids, skip_special_tokens=...)``).
        samples: completions per prompt (``n``); pass rates are multiples of ``1/n``.
        a, b: exponents of the kernel ``p^a (1-p)^b`` (>= 0).
        normalize: divide by the kernel's maximum, so that weights lie in ``[0, 1]``.
        max_new_tokens: cap on each sampled completion.
        temperature: the student's sampling temperature (> 0).
        top_p: nucleus mass of sampling (1.0: the full distribution).
        seed: seeds the samples, with the step and the batch contents.
        every: re-estimate a prompt's pass rate when it is at least this many steps old (1: every
            time the prompt is seen; larger values reuse the cached rate and sample only stale prompts).
        from_step: steps before the weights apply; until then batches pass unchanged (no sampling,
            every problem weight 1). A student that solves nothing has weight 0 on every problem and
            would never learn, so a run from scratch trains plainly first (an option of ours: the paper
            starts from a capable student).
        pad_id, eos_id: special ids (default: read from the student's config).
        score_example: ``score_example(index, completion_ids) -> float`` in ``[0, 1]``, used instead of
            ``verify`` (batches must then carry ``index``).

    Example:
        >>> import transformers
        >>> lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=12, hidden_size=8,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> class Digits:  # decodes ids as digits
        ...     def decode(self, ids, skip_special_tokens=False):
        ...         return "".join(str(i % 10) for i in ids)
        >>> batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 2]]), "attention_mask": torch.ones(1, 5).long(),
        ...          "labels": torch.tensor([[-100, -100, -100, 7, 2]])}
        >>> never = PacedBatches(lambda prompt, completion: False, Digits(), samples=2, max_new_tokens=2,
        ...                      pad_id=0, eos_id=2)
        >>> out = never(batch, lm, step=0)
        >>> out["row_weight"], out["input_ids"] is batch["input_ids"], never.metrics()["pass_rate"]
        (tensor([0.]), True, 0.0)
    """

    def __init__(
        self,
        verify: Callable[[str, str], bool] | None,
        tokenizer: Any,
        *,
        samples: int = 4,
        a: float = 1.0,
        b: float = 1.0,
        normalize: bool = True,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        every: int = 1,
        from_step: int = 0,
        pad_id: int | None = None,
        eos_id: int | None = None,
        score_example: Callable[[int, list[int]], float] | None = None,
    ) -> None:
        if (verify is None) == (score_example is None):
            raise ValueError(
                "give exactly one of verify (prompt, completion text) and score_example (index, ids)"
            )
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not (a >= 0 and b >= 0):
            raise ValueError(f"the exponents must be >= 0; got a={a}, b={b}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if from_step < 0:
            raise ValueError(f"from_step must be >= 0, got {from_step}")
        self.verify = verify
        self.score_example = score_example
        self.tokenizer = tokenizer
        self.samples = int(samples)
        self.a, self.b, self.normalize = float(a), float(b), bool(normalize)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = int(seed)
        self.every = int(every)
        self.from_step = int(from_step)
        self.pad_id, self.eos_id = pad_id, eos_id
        self._cache: dict[tuple, tuple[int, float]] = {}  # prompt ids (or sample id) -> (step, pass rate)
        self.rows_seen = 0
        self.sum_pass_rate = 0.0
        self.sum_weight = 0.0
        self.last: dict[str, float] = {}

    def pass_rates(
        self,
        prompts: Sequence[Sequence[int]],
        student: nn.Module,
        seed: int,
        pad_id: int,
        eos_id: int,
        rows: Sequence[int] | None = None,
    ) -> list[float]:
        """The share of ``samples`` sampled completions of each prompt that ``verify`` accepts (with
        ``score_example``: their mean score, ``rows`` giving each prompt's sample id)."""
        n = self.samples
        repeated = [list(p) for p in prompts for _ in range(n)]  # prompt i -> rows i*n .. i*n + n-1
        completions = generate_completions(
            student,
            repeated,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=True,
            seed=seed,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        rates = []
        if self.score_example is not None:
            for i, row in enumerate(rows):
                scores = [float(self.score_example(row, c)) for c in completions[i * n : (i + 1) * n]]
                rates.append(sum(scores) / n)
            return rates
        for i, prompt in enumerate(prompts):
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=True)
            passed = sum(
                bool(self.verify(text, self.tokenizer.decode(c, skip_special_tokens=False)))
                for c in completions[i * n : (i + 1) * n]
            )
            rates.append(passed / n)
        return rates

    def __call__(self, batch: Mapping[str, Tensor], student: nn.Module, step: int) -> dict[str, Tensor]:
        """A copy of ``batch`` with ``row_weight [B]`` from the student's pass rate on each prompt.

        Args:
            batch: a prompt/response training batch, ``input_ids [B, T]``, ``labels [B, T]`` (-100 on
                ``<bos>``, prompt, padding), optionally ``attention_mask [B, T]`` and per-row keys.
            student: the model being trained (unwrapped), sampled under ``no_grad`` in ``eval()``.
            step: the optimizer step (0-based); with the batch contents it seeds the samples.

        Returns:
            The same entries (the same tensors) plus ``row_weight [B]`` (float32, on the batch's device);
            before ``from_step``, the batch itself.
        """
        if step < self.from_step:
            return batch
        module = as_module(student)
        pad_id, eos_id = special_token_ids(module, self.pad_id, self.eos_id)
        prompts = split_prompts(batch)
        if self.score_example is not None:
            if "index" not in batch:
                raise ValueError("score_example needs the batch's sample ids (`index`)")
            keys = [("row", int(i)) for i in batch["index"].reshape(-1).tolist()]
        else:
            keys = [tuple(p) for p in prompts]
        stale = [
            i for i, k in enumerate(keys) if k not in self._cache or step - self._cache[k][0] >= self.every
        ]
        unique = list(dict.fromkeys(keys[i] for i in stale))  # a repeated prompt is sampled once
        if unique:
            seed = mix_seed(self.seed, "paced", step, tensor_digest(batch["input_ids"]))
            if self.score_example is not None:
                first = {k: i for i, k in reversed(list(enumerate(keys)))}
                rates = self.pass_rates([prompts[first[k]] for k in unique], module, seed, pad_id, eos_id,
                                        rows=[k[1] for k in unique])  # fmt: skip
            else:
                rates = self.pass_rates([list(k) for k in unique], module, seed, pad_id, eos_id)
            self._cache.update({k: (step, r) for k, r in zip(unique, rates)})
        device = batch["input_ids"].device
        p = torch.tensor([self._cache[k][1] for k in keys], dtype=torch.float32)  # (B,)
        w = paced_weights(p, self.a, self.b, self.normalize)  # (B,)
        out = dict(batch)
        out[ROW_WEIGHT_KEY] = w.to(device)
        self.rows_seen += len(keys)
        self.sum_pass_rate += float(p.sum())
        self.sum_weight += float(w.sum())
        self.last = {
            "pass_rate": float(p.mean()),
            "weight": float(w.mean()),
            "solved": float((p == 1).float().mean()),
            "unsolved": float((p == 0).float().mean()),
            "estimated": len(unique) / max(len(set(keys)), 1),
        }
        return out

    def metrics(self) -> dict[str, float]:
        """What the last call saw (mean ``pass_rate`` and ``weight`` of its rows, the shares of rows
        always ``solved`` / never solved (``unsolved``), the share of its prompts whose pass rate was
        sampled afresh (``estimated``)) and running means over every row so far
        (``mean_pass_rate``, ``mean_weight``)."""
        n = max(self.rows_seen, 1)
        return {**self.last, "mean_pass_rate": self.sum_pass_rate / n, "mean_weight": self.sum_weight / n}


__all__ = ["PacedBatches"]
