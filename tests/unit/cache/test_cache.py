"""The teacher-output cache: what it stores, resume and multi-process writing, and every refusal."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distillery import functional as DF
from distillery.cache import CacheError, OutputCache, OutputsConfig, plan, write_outputs
from distillery.cache import writer as cache_writer
from distillery.cache.format import MANIFEST, PLAN, shard_name
from tests.unit.cache.toy import VOCAB, toy_source


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def logits_of(source):
    """The toy teacher's logits for every row, padded to the cache's positions, zero where no target."""
    d = source.dataset
    out = {}
    for pos in range(len(d)):
        b = d.get_batch(torch.tensor([pos]))
        x = source.forward(b).logits[0] * source.valid(b)[0, :, None]
        pad = torch.zeros(source.positions - x.shape[0], VOCAB)
        out[int(b["index"][0])] = (
            torch.cat([x, pad]),
            torch.cat([source.valid(b)[0], torch.zeros(len(pad), dtype=bool)]),
        )
    return out


CONFIGS = {
    "dense": OutputsConfig(kind="dense"),
    "topk": OutputsConfig(kind="topk", k=5, values="fp32"),
    "sampled": OutputsConfig(kind="sampled", k=6, draws=6, seed=3, values="fp32"),
    "topk-int8": OutputsConfig(kind="topk", k=5, values="int8"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_cache_stores_what_the_teacher_gave(tmp_path, name):
    cfg, source = CONFIGS[name], toy_source()
    manifest = write_outputs(tmp_path, source, cfg.model_copy(update={"shard_rows": 4}), batch_size=3)
    assert manifest["num_shards"] == 6 and len(manifest["shards"]) == 6
    assert not (tmp_path / PLAN).exists()
    cache = OutputCache(tmp_path)
    assert all(isinstance(a, np.memmap) for shard in cache.shards for a in shard.values())  # mapped, not read
    truth = logits_of(source)
    ids = torch.tensor([7, 5, 49, 21])  # sample ids (2 i + 5), out of order, across shards
    rows = cache.lookup(ids)
    for j, i in enumerate(ids.tolist()):
        logits, valid = truth[i]
        if cfg.kind == "dense":
            assert torch.equal(rows["logits"][j], logits)
            continue
        if cfg.kind == "topk":
            want_ids, want_logp, want_tail = DF.topk_tail(logits[valid], cfg.k)
            assert torch.equal(rows["ids"][j][valid], want_ids)
            assert torch.allclose(rows["tail"][j][valid], want_tail)
            tol = 1e-6 if cfg.values == "fp32" else float(-want_logp.min()) / 255 / 2 + 1e-6  # half a code
            assert (rows["logp"][j][valid] - want_logp).abs().max() <= tol
        else:  # sampled: the draws of each position, as weights summing to 1 over its distinct ids
            w = rows["weights"][j][valid]
            assert torch.allclose(w.sum(-1), torch.ones(int(valid.sum())))
            assert ((w * cfg.draws).round() == w * cfg.draws).all()
            logp = torch.log_softmax(logits[valid], -1).gather(-1, rows["ids"][j][valid])
            kept = w > 0
            assert torch.allclose(rows["logp"][j][valid][kept], logp[kept], atol=1e-6)
        # positions without a target (prompt, padding) are stored as zeros
        assert not rows["logp"][j][~valid].any()


def test_the_same_inputs_give_the_same_bytes_whatever_the_batch_size_and_process_count(tmp_path):
    cfg = CONFIGS["sampled"].model_copy(update={"shard_rows": 5})
    write_outputs(tmp_path / "one", toy_source(), cfg, batch_size=2)
    write_outputs(tmp_path / "big", toy_source(), cfg, batch_size=50)
    # two processes (threads here, meeting at the writer's barriers): shards 0, 2, 4 and the manifest by the
    # first, shards 1, 3 by the second
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(write_outputs, tmp_path / "two", toy_source(), cfg, batch_size=2, process_index=rank,
                            num_processes=2, barrier=barrier.wait) for rank in (0, 1)]  # fmt: skip
        manifests = [d.result() for d in done]
    assert manifests[0] == manifests[1] == OutputCache(tmp_path / "two").manifest
    assert files(tmp_path / "one") == files(tmp_path / "big") == files(tmp_path / "two")


def test_an_interrupted_writer_continues_from_the_missing_shards(tmp_path, monkeypatch):
    cfg = CONFIGS["topk"].model_copy(update={"shard_rows": 3})
    write_outputs(tmp_path / "whole", toy_source(), cfg)
    real, calls = cache_writer.write_shard, []

    def dies_after_three(path, i, *args, **kwargs):
        if len(calls) == 3:
            (path / f".shard-{i:05d}.safetensors.tmp").write_bytes(b"half")  # killed inside a write
            raise KeyboardInterrupt
        calls.append(i)
        real(path, i, *args, **kwargs)

    monkeypatch.setattr(cache_writer, "write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "resumed", toy_source(), cfg)
    monkeypatch.undo()
    with pytest.raises(CacheError, match=r"unfinished: 5 of 8 shards are missing \(shard-00003"):
        OutputCache(tmp_path / "resumed")
    written = []
    monkeypatch.setattr(
        cache_writer, "write_shard", lambda path, i, *a, **k: (written.append(i), real(path, i, *a, **k))
    )
    write_outputs(tmp_path / "resumed", toy_source(), cfg)
    assert written == [3, 4, 5, 6, 7]
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")


def _refusal(tmp_path, **changes) -> str:
    cfg = changes.pop("cfg", CONFIGS["topk"])
    write_outputs(tmp_path, toy_source(), CONFIGS["topk"])
    other = toy_source(**changes)
    with pytest.raises(CacheError) as info:
        OutputCache(tmp_path).check(plan(other, cfg))
    with pytest.raises(CacheError) as writing:  # writing into the folder is refused the same way
        write_outputs(tmp_path, other, cfg)
    assert "other settings" in str(writing.value)
    return str(info.value)


def test_a_cache_of_another_teacher_tokenizer_dataset_k_or_kind_is_refused_naming_the_field(tmp_path):
    theirs = plan(toy_source(), CONFIGS["topk"])
    msg = _refusal(tmp_path / "t", teacher_seed=1)
    assert "teacher (hash of its weights): the cache has " + theirs["identity"]["teacher"][:16] in msg
    assert msg.count("teacher (hash") == 1 and "dataset" not in msg
    assert "tokenizer (hash): the cache has tok-a, this run tok-b" in _refusal(
        tmp_path / "z", tokenizer="tok-b"
    )
    assert "dataset (hash of the inputs in row order)" in _refusal(tmp_path / "d", data_seed=1)
    msg = _refusal(tmp_path / "k", cfg=OutputsConfig(kind="topk", k=7, values="fp32"))
    assert "k: the cache has 5, this run 7" in msg
    msg = _refusal(tmp_path / "s", cfg=OutputsConfig(kind="sampled", k=5, values="fp32"))
    assert "cache kind: the cache has topk, this run sampled" in msg


def test_a_damaged_shard_is_named(tmp_path):
    write_outputs(tmp_path, toy_source(), CONFIGS["dense"].model_copy(update={"shard_rows": 8}))
    shard = tmp_path / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard shard-00001.safetensors .* fails its sha256 check"):
        OutputCache(tmp_path)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(
        CacheError, match=r"shard-00001.safetensors .* bytes where .* were written \(truncated"
    ):
        OutputCache(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001.safetensors .* is missing"):
        OutputCache(tmp_path)


def test_rows_missing_for_the_training_data_are_counted_with_the_shards_held(tmp_path):
    write_outputs(tmp_path, toy_source(10), CONFIGS["dense"].model_copy(update={"shard_rows": 4}))
    cache = OutputCache(tmp_path)
    cache.check_covers(toy_source(10).dataset.index)
    with pytest.raises(CacheError) as info:
        cache.check_covers(toy_source(13).dataset.index)
    msg = str(info.value)
    assert "holds 10 rows (3 shards, shard-00000.safetensors .. shard-00002.safetensors)" in msg
    assert "3 of the 13 rows of the training data" in msg and "sample ids 25, 27, 29" in msg
    with pytest.raises(CacheError, match="no cached teacher outputs for sample ids 6"):
        cache.lookup(torch.tensor([5, 6]))


def test_files_the_manifest_does_not_list_are_never_read_and_named(tmp_path):
    write_outputs(tmp_path, toy_source(), CONFIGS["dense"].model_copy(update={"shard_rows": 8}))
    (tmp_path / "shard-00007.safetensors").write_bytes(b"written by another program")
    (tmp_path / ".shard-00001.safetensors.tmp").write_bytes(b"half")
    cache = OutputCache(tmp_path)
    assert cache.strays == [".shard-00001.safetensors.tmp", "shard-00007.safetensors"]
    assert cache.lookup(torch.tensor([5]))["logits"].shape == (1, 7, VOCAB)


def test_absent_cache_and_bad_settings(tmp_path):
    with pytest.raises(CacheError, match=r"no teacher-output cache at .*distillery cache"):
        OutputCache(tmp_path)
    with pytest.raises(ValidationError, match="Input should be 'dense', 'topk' or 'sampled'"):
        OutputsConfig(kind="full")
    for k in (0, -3):
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            OutputsConfig(kind="topk", k=k)
    with pytest.raises(ValidationError, match="kind=topk needs teacher.outputs.k"):
        OutputsConfig(kind="topk")
    with pytest.raises(ValidationError, match="teacher.outputs.k is for sparse caches"):
        OutputsConfig(kind="dense", k=4)
    with pytest.raises(CacheError, match=f"k=38 must be between 1 and the vocabulary size {VOCAB}"):
        write_outputs(tmp_path / "c", toy_source(), OutputsConfig(kind="topk", k=VOCAB + 1))
    assert not (tmp_path / "c").exists()


def test_a_folder_that_is_not_writable_is_refused(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")  # not writable whoever runs the test
    with pytest.raises(CacheError, match=r"cache folder .*file/seed is not writable \(Not a directory\)"):
        write_outputs(tmp_path / "file" / "seed", toy_source(), CONFIGS["dense"])


def test_a_complete_cache_is_left_as_it_is(tmp_path):
    write_outputs(tmp_path, toy_source(), CONFIGS["dense"])
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    manifest = write_outputs(tmp_path, toy_source(), CONFIGS["dense"])
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert manifest == OutputCache(tmp_path).manifest and MANIFEST in before


def test_features_are_stored_beside_the_logits(tmp_path):
    cfg = OutputsConfig(kind="topk", k=3, features=["pooled"], values="fp32")
    source = toy_source()
    write_outputs(tmp_path, source, cfg)
    rows = OutputCache(tmp_path).lookup(torch.tensor([9]))
    b = source.dataset.get_batch(torch.tensor([2]))
    assert torch.equal(rows["feature.pooled"][0], source.forward(b).features["pooled"][0])
    with pytest.raises(
        CacheError, match="names 'hidden', which the teacher does not produce; it gives: pooled"
    ):
        write_outputs(tmp_path / "x", source, OutputsConfig(features=["hidden"]))
