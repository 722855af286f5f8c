"""Sampling for language-model distillation: sequence-level, on-policy (GKD) and speculative (SKD) data.

- :mod:`~distillery.generation.sampling`: prompts out of training batches, batched generation with a
  KV cache, completions back into training batches; the teacher's responses for sequence-level KD,
  generated once and cached as JSONL.
- :mod:`~distillery.generation.on_policy`: :class:`OnPolicyBatches`, GKD's "student samples with
  probability lambda" as a ``transform(batch, student, step) -> batch`` hook of the training loop.
- :mod:`~distillery.generation.speculative`: SKD's interleaved sampling (student proposes, teacher
  replaces proposals outside its top-k) and :class:`SpeculativeBatches`.
- :mod:`~distillery.generation.paced`: :class:`PacedBatches`, PACED's per-problem weights from the
  student's pass rate on sampled answers (``row_weight`` in the batch; the responses are unchanged).

``transformers`` is imported only when :func:`generate_completions` runs.
"""

from distillery.generation.on_policy import SAMPLED_KEY, OnPolicyBatches, ResponseSampler
from distillery.generation.paced import PacedBatches
from distillery.generation.sampling import (
    build_batch,
    generate_completions,
    sequence_level_pairs,
    split_prompts,
)
from distillery.generation.speculative import SpeculativeBatches, SpeculativeSample, speculative_completions

__all__ = [
    "SAMPLED_KEY",
    "OnPolicyBatches",
    "PacedBatches",
    "ResponseSampler",
    "SpeculativeBatches",
    "SpeculativeSample",
    "build_batch",
    "generate_completions",
    "sequence_level_pairs",
    "speculative_completions",
    "split_prompts",
]
