"""Writes the toy teacher-output cache into a folder, optionally killing itself (used by the fault tests).

    python tests/faults/_cache_writer.py FOLDER [rename N]

Prints ``writing`` just before it starts (the parent may then SIGKILL it at a random moment); with
``rename N`` it SIGKILLs itself inside the N-th durable write (the temporary file complete, its rename
not done).
"""

from __future__ import annotations

import os
import signal
import sys

from distillery import fileio
from distillery.cache import OutputsConfig, write_outputs
from tests.unit.cache.toy import toy_source

# 30 shards of 2 rows, 50 ms per teacher forward: a writer takes about 1.5 seconds
CONFIG = OutputsConfig(kind="sampled", k=5, draws=5, seed=1, shard_rows=2, values="int8")
ROWS = 60


def main() -> int:
    folder = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "rename":
        n, seen = int(sys.argv[3]), [0]

        def kill_inside_write(tmp) -> None:
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        fileio.HOOKS["before_rename"].append(kill_inside_write)
    print("writing", flush=True)
    write_outputs(folder, toy_source(ROWS, delay=0.05), CONFIG, batch_size=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
