"""Self-revision batches (SD-Zero): the model answers, its answer is judged, the same model revises.

"Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision" (SD-Zero) trains
one model in two roles. The *generator* answers a prompt ``x`` (``y ~ p(. | x)``); a verifier gives
the answer a binary reward ``r``; the *reviser* -- the same model, shown ``x``, ``y`` and ``r`` --
writes a revised answer ``y'``; and the generator is distilled towards the reviser's token
distributions over ``y'``, given ``x`` alone. The binary reward so becomes dense, token-level
supervision.

:class:`RevisionBatches` is that data step as a batch transform of the loop, like
:class:`~distillery.generation.OnPolicyBatches`: every batch's responses are replaced by revisions
(the batch carries :data:`~distillery.generation.SAMPLED_KEY`), and the reviser's full prompt of
each row travels with the batch under :data:`TEACHER_PROMPT_IDS` / :data:`TEACHER_PROMPT_LENGTHS`,
which a :class:`~distillery.teachers.self_context.SelfContextTeacher` reads instead of its fixed
contexts: its distributions over ``y'`` are then the reviser's. The attempt and the revision are
sampled from ``(seed, step, batch contents)``, so a resumed run makes the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.generation.on_policy import ResponseSampler
from distillery.generation.sampling import generate_completions, mix_seed
from distillery.teachers.self_context import TEACHER_PROMPT_IDS, TEACHER_PROMPT_LENGTHS


class RevisionBatches(ResponseSampler):
    """SD-Zero's data step: attempt, judge, revise; the batch's responses become the revisions.

    Args:
        reviser: returns the model that revises (the self-context teacher's module, read at each call:
            a live or EMA teacher moves with training).
        judge: ``judge(sample id, attempt ids) -> bool``, the verifier's reward of an attempt.
        context: ``context(sample id, prompt ids, attempt ids, reward) -> ids``: the reviser's prompt
            (``<bos>`` included), e.g. the template ``"{prompt}{attempt} is {reward}. again: {prompt}"``.
        max_new_tokens, temperature, seed, pad_id, eos_id: as for
            :class:`~distillery.generation.OnPolicyBatches` (both the attempt and the revision).

    Example:
        >>> import transformers
        >>> lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=12, hidden_size=8,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 2]]), "attention_mask": torch.ones(1, 5).long(),
        ...          "labels": torch.tensor([[-100, -100, -100, 7, 2]]), "index": torch.tensor([0])}
        >>> step = RevisionBatches(lambda: lm, judge=lambda i, ids: False,
        ...     context=lambda i, prompt, attempt, ok: [prompt[0], 9, *attempt, 10 + ok, *prompt[1:]],
        ...     max_new_tokens=3, pad_id=0, eos_id=2)
        >>> out = step(batch, lm, step=0)
        >>> out["input_ids"][0, :3].tolist(), out[TEACHER_PROMPT_IDS][0, :2].tolist(), step.metrics()["reward"]
        ([1, 5, 6], [1, 9], 0.0)
    """

    def __init__(
        self,
        reviser: Callable[[], nn.Module],
        *,
        judge: Callable[[int, list[int]], bool],
        context: Callable[[int, list[int], list[int], bool], list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int = 0,
        pad_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__(1.0, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         pad_id=pad_id, eos_id=eos_id)  # fmt: skip
        self.reviser, self.judge, self.context = reviser, judge, context
        self._index: list[int] = []
        self._prompts: list[list[int]] = []

    def __call__(self, batch: Mapping[str, Tensor], student: nn.Module, step: int) -> Mapping[str, Tensor]:
        index = batch.get("index")
        if index is None:
            raise ValueError("self-revision batches need the rows' sample ids (batch['index'])")
        self._index = [int(i) for i in index]
        out = dict(super().__call__(batch, student, step))
        width = max(len(p) for p in self._prompts)
        ids = torch.full((len(self._prompts), width), self.pad_id or 0, dtype=torch.long)
        for b, row in enumerate(self._prompts):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        device = out["input_ids"].device
        out[TEACHER_PROMPT_IDS] = ids.to(device)
        out[TEACHER_PROMPT_LENGTHS] = torch.tensor([len(p) for p in self._prompts], device=device)
        return out

    def sample(
        self, prompt_rows: Sequence[Sequence[int]], student: nn.Module, seed: int, pad_id: int, eos_id: int
    ) -> tuple[list[list[int]], dict[str, Any]]:
        common = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "do_sample": True,
                  "eos_id": eos_id, "pad_id": pad_id}  # fmt: skip
        attempts = generate_completions(student, prompt_rows, seed=seed, **common)
        rewards = [bool(self.judge(i, a)) for i, a in zip(self._index, attempts)]
        self._prompts = [
            list(self.context(i, list(p), a, r))
            for i, p, a, r in zip(self._index, prompt_rows, attempts, rewards)
        ]
        revisions = generate_completions(
            self.reviser(), self._prompts, seed=mix_seed(seed, "revise"), **common
        )
        revised = [bool(self.judge(i, a)) for i, a in zip(self._index, revisions)]
        n = max(len(rewards), 1)
        return revisions, {"reward": sum(rewards) / n, "revised_reward": sum(revised) / n}
