"""A teacher-output cache writer killed (SIGKILL) at random moments and inside its writes, then run
again, ends with a cache identical byte for byte to one written without interruption."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from distillery.cache import OutputCache, write_outputs
from distillery.cache.format import MANIFEST
from tests.faults._cache_writer import CONFIG, ROWS
from tests.faults.conftest import TALLY
from tests.unit.cache.toy import toy_source

ROOT = Path(__file__).resolve().parents[2]
WRITER = ROOT / "tests" / "faults" / "_cache_writer.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _start(folder: Path, *fault: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WRITER), str(folder), *fault], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_killed_writer_resumes_to_an_identical_cache(tmp_path):
    whole = tmp_path / "whole"
    write_outputs(whole, toy_source(ROWS, delay=0.0), CONFIG, batch_size=2)
    folder = tmp_path / "killed"
    rng = random.Random(0)
    shards_seen = []
    for n in (1, 4, 9):  # inside the N-th durable write of a run (1: the plan, then shards)
        p = _start(folder, "rename", str(n))
        p.communicate(timeout=120)
        assert p.returncode == -9, p.stderr
        shards_seen.append(len(list(folder.glob("shard-*.safetensors"))))
    for _ in range(4):  # at random moments while shards are being written
        p = _start(folder)
        assert p.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.02, 0.2))
        p.kill()
        p.communicate(timeout=120)
        shards_seen.append(len(list(folder.glob("shard-*.safetensors"))))
    assert not (folder / MANIFEST).exists(), (
        "every run was to be killed before finishing; slow the writer down"
    )
    assert shards_seen == sorted(shards_seen) and shards_seen[-1] > shards_seen[0]
    p = _start(folder)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert sorted(x.name for x in folder.iterdir()) == sorted(x.name for x in whole.iterdir())
    for x in whole.iterdir():
        assert (folder / x.name).read_bytes() == x.read_bytes(), x.name
    assert OutputCache(folder).strays == []
    TALLY["kills survived identical"] += 7
