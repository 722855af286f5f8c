"""Teacher outputs computed once and looked up by sample id."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from distillery.models.adapters import TEACHER_IDS, TEACHER_LOGP, TEACHER_TAIL, TEACHER_WEIGHTS
from distillery.teachers.base import BaseTeacher, Teacher, TeacherOutput


class CachedTeacher(BaseTeacher):
    """Serves stored logits by ``batch["index"]`` (the stable sample id), with no forward pass.

    Valid when the teacher's input for a sample never changes (no training-time augmentation); it then
    gives the same training run as the live teacher, only faster.

    Args:
        logits: ``[N, C]`` stored logits.
        ids: ``[N]`` the sample id of each row.
    """

    fsdp = "ok"  # see BaseTeacher

    def __init__(self, logits: Tensor, ids: Tensor) -> None:
        if logits.shape[0] != ids.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows but {ids.shape[0]} sample ids")
        size = int(ids.max()) + 1 if len(ids) else 0
        self.table = torch.zeros(size, *logits.shape[1:], dtype=torch.float32)
        self.known = torch.zeros(size, dtype=torch.bool)
        self.table[ids] = logits.float()
        self.known[ids] = True

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        ids = batch["index"].cpu()
        if len(ids) and (int(ids.max()) >= len(self.known) or not bool(self.known[ids].all())):
            missing = ids[(ids >= len(self.known)) | ~self.known[ids.clamp_max(max(len(self.known) - 1, 0))]]
            raise KeyError(f"no cached teacher outputs for sample ids {missing[:5].tolist()}")
        return TeacherOutput(logits=self.table[ids].to(batch["index"].device))

    @classmethod
    def precompute(cls, teacher: Teacher, dataset, batch_size: int = 1024) -> CachedTeacher:
        """Run ``teacher`` once over ``dataset`` (anything with ``get_batch`` and ``__len__``)."""
        chunks, ids = [], []
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            chunks.append(teacher(batch).logits.cpu())
            ids.append(batch["index"].cpu())
        return cls(torch.cat(chunks), torch.cat(ids))


class OutputCacheTeacher(BaseTeacher):
    """Serves a teacher's outputs from an on-disk cache (:class:`distillery.cache.OutputCache`) by
    ``batch["index"]``, with no forward pass.

    A dense cache gives ``logits``; a top-k or sampled one gives no logits and the features
    ``TEACHER_IDS``, ``TEACHER_LOGP`` and ``TEACHER_TAIL`` (top-k) or ``TEACHER_WEIGHTS`` (sampled),
    which the loss terms that support sparse teachers read; stored features come under their names.
    Language models: ``positions(batch)`` is the number of output positions of the batch (its longest
    row minus one); the stored rows, padded to the longest training row, are cut to it along dim 1, or
    along the dims ``token_dims(name)`` gives for each stored tensor (a sentence encoder's attention maps
    have two token dims, its pooled embedding none).

    ``live`` (optional) is a live teacher for batches the cache cannot hold: those for which
    ``use_live(batch)`` is true (on-policy batches, whose responses the student just sampled). The
    counters :attr:`cache_calls` and :attr:`live_calls` say how often each served a batch.
    """

    fsdp = "ok"  # see BaseTeacher

    def __init__(
        self, cache, *, positions=None, token_dims=None, live: Teacher | None = None, use_live=None
    ) -> None:
        self.cache = cache
        self.positions = positions
        self.token_dims = token_dims or (lambda name: (1,))
        self.live, self.use_live = live, use_live
        if live is not None and use_live is None:
            raise ValueError(
                "a live teacher beside the cache needs use_live(batch) saying which batches it serves"
            )
        self.names = {
            "ids": TEACHER_IDS,
            "logp": TEACHER_LOGP,
            "tail": TEACHER_TAIL,
            "weights": TEACHER_WEIGHTS,
        }
        self.cache_calls = 0
        self.live_calls = 0

    def __call__(self, batch: Mapping[str, Tensor], student_output=None) -> TeacherOutput:
        if self.live is not None and self.use_live(batch):
            self.live_calls += 1
            return self.live(batch, student_output)
        self.cache_calls += 1
        device = batch["index"].device
        rows = self.cache.lookup(batch["index"])
        n = None if self.positions is None else self.positions(batch)

        def fit(name: str, x: Tensor) -> Tensor:
            if n is not None:
                for dim in self.token_dims(name):
                    x = x.narrow(dim, 0, n)
            return x.to(device)

        logits = fit("logits", rows.pop("logits")) if "logits" in rows else None
        features = {}
        for name, x in rows.items():
            key = name.removeprefix("feature.") if name.startswith("feature.") else self.names[name]
            features[key] = fit(key, x)
        return TeacherOutput(logits=logits, features=features)

    def to(self, device) -> OutputCacheTeacher:
        if self.live is not None and hasattr(self.live, "to"):
            self.live.to(device)
        return self
