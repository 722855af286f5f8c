"""Which examples each optimizer step uses: a deterministic stream of shuffled epochs."""

from __future__ import annotations

import torch
from torch import Tensor


class BatchPlan:
    """Example positions for step k: positions ``[k*B, (k+1)*B)`` of the concatenation of per-epoch
    permutations ``perm(seed, 0) ++ perm(seed, 1) ++ ...``.

    Every batch is full (batches may straddle an epoch boundary), nothing is dropped, and the plan is
    a pure function of ``(seed, step)``: resuming at step k needs no saved sampler state, and the
    split across micro-batches and processes does not change which examples a step sees.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError("the training set is empty")
        self.n = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        """``[B]`` example positions used by optimizer step ``step`` (0-based)."""
        start = step * self.batch_size
        out = []
        pos = start
        end = start + self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, end - pos)
            out.append(self._perm(epoch)[offset : offset + take])
            pos += take
        return torch.cat(out)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n
