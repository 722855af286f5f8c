"""On-policy distillation (GKD): train on the student's own samples with probability lambda.

"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (Agarwal et al.,
GKD) mixes two data sources. At every step, with probability ``lambda`` the responses of the batch
are replaced by completions the student samples from its current policy (the prompts are kept);
otherwise the fixed responses are used. Either way the teacher then scores every response token and
the student is trained to match the teacher token by token with a divergence ``D`` (GKD uses the
generalized JSD(beta)):

.. math::

    L(\\theta) = (1-\\lambda)\\, \\mathbb{E}_{(x,y) \\sim \\text{data}}\\big[D(p_T \\| p_S^\\theta)(y|x)\\big]
        + \\lambda\\, \\mathbb{E}_{x \\sim \\text{data},\\, y \\sim p_S(\\cdot|x)}\\big[D(p_T \\| p_S^\\theta)(y|x)\\big]

with ``D(y|x) = 1/|y| sum_t D(p_T(.|y_<t, x) || p_S(.|y_<t, x))``. No gradient flows through the
sampling. ``lambda = 0`` is supervised KD on the fixed data, ``lambda = 1`` is fully on-policy.

:class:`OnPolicyBatches` is that data step as a batch transform for the training loop,
``transform(batch, student, step) -> batch``: the loop then runs the student and the (live) teacher on
the returned batch as on any other, one teacher forward per batch. It is a pure function of
``(batch, student, step)`` and its seed: the coin of a step comes from ``(seed, step)`` and the
samples from ``(seed, step, batch contents)``, so a resumed run makes the same choices.

A teacher whose outputs are looked up by sample id cannot score fresh samples: sampled batches carry
:data:`SAMPLED_KEY`, and a cached teacher (:class:`~distillery.teachers.OutputCacheTeacher`) serves
them with its live teacher, the other batches from its cache (for ``lambda < 1`` that removes the
teacher forward from the off-policy fraction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.generation.sampling import (
    as_module,
    build_batch,
    generate_completions,
    mix_seed,
    special_token_ids,
    split_prompts,
    tensor_digest,
)

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
# Batch key ``[B]`` (bool, all True) of a batch whose responses were just sampled: a teacher whose
# outputs come from a cache serves it with its live teacher (the cache holds the fixed responses only).
SAMPLED_KEY = "sampled"


class ResponseSampler:
    """Base of the batch transforms that replace responses with sampled ones, with probability lambda.

    Subclasses implement :meth:`sample`. This class draws the per-step coin, splits prompts off the
    batch, lays the samples back out (:func:`~distillery.generation.sampling.build_batch`) on the
    batch's device and records what happened for logging (:meth:`metrics`).

    Args:
        student_lambda: probability in ``[0, 1]`` that a step's batches get sampled responses.
        max_new_tokens: cap on each sampled response.
        temperature: sampling temperature (> 0).
        seed: seeds the coins and the samples.
        pad_id, eos_id: special ids (default: read from the student's config).
    """

    def __init__(
        self,
        student_lambda: float,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int = 0,
        pad_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        if not 0.0 <= student_lambda <= 1.0:
            raise ValueError(f"student_lambda must be in [0, 1], got {student_lambda}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student_lambda = float(student_lambda)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.batches = 0  # calls so far (micro-batches)
        self.sampled_batches = 0  # of which got sampled responses
        self.last: dict[str, float] = {}

    def decide(self, step: int) -> bool:
        """Whether the batches of ``step`` get sampled responses: ``u < lambda``, ``u ~ U[0, 1)`` drawn
        from a generator seeded by ``(seed, step)`` (so every micro-batch and process of a step agrees)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, "coin", step))
        return bool(torch.rand((), generator=g) < self.student_lambda)

    def sample(
        self, prompt_rows: list[list[int]], student: nn.Module, seed: int, pad_id: int, eos_id: int
    ) -> tuple[list[list[int]], dict[str, float]]:
        """Completions of ``prompt_rows`` and extra metrics; overridden by subclasses."""
        raise NotImplementedError

    def __call__(self, batch: Mapping[str, Tensor], student: nn.Module, step: int) -> Mapping[str, Tensor]:
        """The batch with sampled responses (probability lambda), else the same batch object.

        Args:
            batch: a prompt/response training batch, ``input_ids [B, T]``, ``attention_mask [B, T]``,
                ``labels [B, T]`` (-100 on ``<bos>``, prompt, padding) and optionally ``index [B]``.
            student: the model being trained (unwrapped); it samples under ``no_grad`` in ``eval()``
                mode and is returned to its previous mode.
            step: the optimizer step (0-based), which seeds the coin and the samples.

        Returns:
            The same layout, ``T`` now the longest ``prompt + sample`` row; labels cover exactly the
            sampled tokens. Per-row keys (1-D, such as ``index``) are carried over.
        """
        self.batches += 1
        if not self.decide(step):
            self.last = {"on_policy": 0.0}
            return batch
        extra = [
            k for k, v in batch.items() if k not in _SEQUENCE_KEYS and isinstance(v, Tensor) and v.dim() > 1
        ]
        if extra:
            raise ValueError(
                f"batch keys {extra} are per-token and cannot be carried over to sampled responses; "
                f"a sampled batch has only {list(_SEQUENCE_KEYS)} per token"
            )
        module = as_module(student)
        pad_id, eos_id = special_token_ids(module, self.pad_id, self.eos_id)
        prompts = split_prompts(batch)
        seed = mix_seed(self.seed, "sample", step, tensor_digest(batch["input_ids"]))
        completions, metrics = self.sample(prompts, module, seed, pad_id, eos_id)
        device = batch["input_ids"].device
        new = build_batch(prompts, completions, pad_id=pad_id)
        out: dict[str, Any] = {k: v for k, v in batch.items() if k not in _SEQUENCE_KEYS}
        out.update({k: v.to(device) for k, v in new.items()})
        out[SAMPLED_KEY] = torch.ones(len(completions), dtype=torch.bool, device=device)
        self.sampled_batches += 1
        self.last = {
            "on_policy": 1.0,
            "sampled_tokens": sum(len(c) for c in completions) / len(completions),
            "finished": sum(bool(c) and c[-1] == eos_id for c in completions) / len(completions),
            **metrics,
        }
        return out

    def metrics(self) -> dict[str, float]:
        """What the last call did (``on_policy`` 0/1, mean ``sampled_tokens`` per row, the share of
        rows that ended with ``<eos>`` (``finished``), subclass extras) and the running
        ``on_policy_fraction`` of all calls so far."""
        return {**self.last, "on_policy_fraction": self.sampled_batches / max(self.batches, 1)}


class OnPolicyBatches(ResponseSampler):
    """GKD's data step: with probability ``student_lambda`` the responses are the student's samples.

    From "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (see the
    module docstring for the objective). Sampling uses Hugging Face ``generate`` with a KV cache, at
    ``temperature`` with nucleus ``top_p``, seeded by ``(seed, step, batch contents)``.

    Args:
        student_lambda: probability in ``[0, 1]`` of on-policy data at a step (GKD's lambda).
        max_new_tokens: cap on each sampled response.
        temperature: the student's sampling temperature (GKD samples at 1.0).
        top_p: nucleus mass of sampling (1.0: the full distribution).
        seed: seeds the coins and the samples.
        pad_id, eos_id: special ids (default: read from the student's config).

    Example:
        >>> import transformers
        >>> lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=12, hidden_size=8,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 2]]), "attention_mask": torch.ones(1, 5).long(),
        ...          "labels": torch.tensor([[-100, -100, -100, 7, 2]])}
        >>> transform = OnPolicyBatches(1.0, max_new_tokens=3, seed=0, pad_id=0, eos_id=2)
        >>> out = transform(batch, lm, step=0)
        >>> out["input_ids"][0, :3].tolist(), transform.metrics()["on_policy"]
        ([1, 5, 6], 1.0)
        >>> OnPolicyBatches(0.0, max_new_tokens=3, pad_id=0, eos_id=2)(batch, lm, step=0) is batch
        True
    """

    def __init__(
        self,
        student_lambda: float = 0.5,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        pad_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__(
            student_lambda,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            pad_id=pad_id,
            eos_id=eos_id,
        )
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = float(top_p)

    def sample(
        self, prompt_rows: Sequence[Sequence[int]], student: nn.Module, seed: int, pad_id: int, eos_id: int
    ) -> tuple[list[list[int]], dict[str, float]]:
        completions = generate_completions(
            student,
            prompt_rows,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=True,
            seed=seed,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        return completions, {}
