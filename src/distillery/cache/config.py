"""The ``teacher.outputs`` section: which teacher outputs a cache holds and where it lives."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distillery.configbase import StrictModel

KINDS = ("dense", "topk", "sampled")


class OutputsConfig(StrictModel):
    """Teacher outputs computed once, stored on disk and read back by every run that needs them.

    ``dense`` keeps the whole distribution (a classifier's logits, or a language model's logits over the
    vocabulary at every position); ``topk`` the ``k`` most likely ids with their log-probabilities and the
    probability left outside them (one number per token); ``sampled`` ``draws`` ids drawn from the
    teacher's distribution, kept as up to ``k`` distinct ids with their counts and log-probabilities
    ("Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").
    """

    kind: Literal["dense", "topk", "sampled"] = Field(
        "dense", description="dense: every logit; topk: the k largest + the tail mass; sampled: k sampled ids"
    )
    k: int | None = Field(
        None, ge=1, description="topk, sampled: ids kept per token (at most the vocabulary size)"
    )
    draws: int | None = Field(
        None, ge=1, le=65535, description="sampled: draws per token (null: k, which is unbiased)"
    )
    values: Literal["fp32", "fp16", "int8"] | None = Field(
        None,
        description="storage of the values: fp32, fp16, or int8 (sparse log-probabilities as 8-bit codes with a "
        "per-token scale); null: fp32 for dense, fp16 for topk and sampled",
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="topk, sampled: the teacher temperature the stored distribution is taken at (the loss terms' "
        "temperature must equal it); dense caches store logits and serve any temperature",
    )
    features: list[str] = Field(
        default_factory=list,
        description="named teacher features stored beside the logits (representation terms)",
    )
    path: str | None = Field(
        None,
        description="folder of the cache (one subfolder seed-<n> per seed); null: under the distillery cache "
        "(DISTILLERY_CACHE or ~/.cache/distillery), keyed by the teacher and these settings",
    )
    write: Literal["missing", "never"] = Field(
        "missing",
        description="missing: a run writes the cache when it is absent (and finishes a partial one); never: a run "
        "only reads, and an absent cache is an error (write it with `distillery cache`)",
    )
    shard_rows: int | None = Field(
        None, ge=1, description="rows (examples or sequences) per shard file; null: about 64 MiB per shard"
    )
    batch_size: int | None = Field(None, ge=1, description="rows per teacher forward (null: eval.batch_size)")
    seed: int = Field(
        0, description="sampled: seed of the draws (each row's draws depend on it and the row id)"
    )
    verify: bool = Field(
        True, description="check every shard's sha256 against the manifest when a run opens it"
    )

    @model_validator(mode="after")
    def _consistent(self) -> OutputsConfig:
        if self.kind == "dense":
            given = [f for f in ("k", "draws") if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"teacher.outputs.{given[0]} is for sparse caches (kind topk or sampled), but kind=dense keeps "
                    "every logit; set teacher.outputs.kind=topk or sampled, or drop the field"
                )
            if self.values == "int8":
                raise ValueError(
                    "teacher.outputs.values=int8 quantises sparse log-probabilities; dense caches store fp32 or "
                    "fp16 logits"
                )
            return self
        if self.k is None:
            raise ValueError(
                f"teacher.outputs.kind={self.kind} needs teacher.outputs.k (ids kept per token, e.g. 64)"
            )
        if self.kind == "topk" and self.draws is not None:
            raise ValueError("teacher.outputs.draws is for kind=sampled; top-k keeps the k largest ids")
        return self

    @property
    def value_dtype(self) -> str:
        """The resolved storage of the values (``values`` or its default)."""
        return self.values or ("fp32" if self.kind == "dense" else "fp16")

    @property
    def num_draws(self) -> int | None:
        return None if self.kind != "sampled" else (self.draws or self.k)

    def identity(self) -> dict:
        """What of this section determines the cache's content (the writing settings aside)."""
        return {
            "kind": self.kind,
            "k": self.k,
            "draws": self.num_draws,
            "values": self.value_dtype,
            "temperature": self.temperature if self.kind != "dense" else None,
            "features": sorted(self.features),
            "seed": self.seed if self.kind == "sampled" else None,
        }


def outputs_for(source: str, outputs: OutputsConfig | None) -> OutputsConfig | None:
    """The ``teacher.outputs`` section of a teacher with ``teacher.source`` = ``source``: the default one for
    ``cache``, none for a live (``frozen``) teacher, which refuses one (raises ValueError)."""
    if source != "cache" and outputs is not None:
        raise ValueError(
            "teacher.outputs describes a cache of the teacher's outputs, for teacher.source=cache; set "
            "teacher.source=cache or drop teacher.outputs"
        )
    if source == "cache" and outputs is None:
        return OutputsConfig()
    return outputs
