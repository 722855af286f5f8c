"""Teacher outputs computed once: write them to disk in shards, read them back by sample id.

* :class:`OutputsConfig`: the ``teacher.outputs`` section (kind dense / topk / sampled, k, storage).
* :func:`write_outputs`: run a teacher over a dataset (an :class:`OutputSource`) into a cache folder,
  resumable shard by shard, one manifest for all processes.
* :class:`OutputCache`: a finished cache, checked against the run and memory-mapped.

The format is described in :mod:`distillery.cache.format`.
"""

from distillery.cache.config import KINDS, OutputsConfig
from distillery.cache.format import CacheError, dataset_fingerprint, tensors_sha256, weights_sha256
from distillery.cache.reader import OutputCache, open_cache
from distillery.cache.writer import OutputSource, compress, plan, write_outputs

__all__ = [
    "KINDS",
    "CacheError",
    "OutputCache",
    "OutputSource",
    "OutputsConfig",
    "compress",
    "dataset_fingerprint",
    "open_cache",
    "plan",
    "tensors_sha256",
    "weights_sha256",
    "write_outputs",
]
