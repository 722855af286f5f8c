"""Runs ``distillery`` with a fault injected at an exact moment (used by the fault tests).

    python tests/faults/_killer.py MODE N -- distillery arguments...

MODE is ``step`` (SIGKILL right after the N-th training record of the run's arms is logged: with
one record per step and 30-step arms, N=37 is step 7 of the second arm), ``rename`` (SIGKILL inside a durable write --
the N-th, or, when N is not a number, the first whose temporary path contains N: its temporary file
or folder is complete, the rename has not happened), ``sigint`` or
``sigterm`` (the signal arrives during step N; training checkpoints and stops), ``shard`` (under
``train.parallel=fsdp``: SIGKILL of the *second* process right after it wrote its shard of the N-th
sharded checkpoint, the main process still inside the same write). Under several processes only the
main process (rank 0) injects the other faults.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    mode, arg = sys.argv[1], sys.argv[2]
    n = int(arg) if arg.isdigit() else None
    args = sys.argv[sys.argv.index("--") + 1 :]
    rank = int(os.environ.get("RANK", "0"))

    from distillery import fileio
    from distillery.cli import main as cli
    from distillery.train import logging as metric_log

    if mode == "shard":
        shards = [0]

        def kill_after_shard(tmp):
            shards[0] += 1
            if rank == 1 and shards[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        fileio.HOOKS["after_shard"].append(kill_after_shard)
    elif rank == 0 and mode == "rename":
        seen = [0]

        def kill_inside_write(tmp):
            seen[0] += 1
            if seen[0] == n or (n is None and arg in str(tmp)):
                os.kill(os.getpid(), signal.SIGKILL)

        fileio.HOOKS["before_rename"].append(kill_inside_write)
    elif rank == 0:
        log = metric_log.MetricLog.log
        sig = {"step": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[mode]

        records = [0]

        def log_then_signal(self, step, split, values):
            log(self, step, split, values)
            # student arms only: the teacher trains without a run folder and logs nothing
            if split == "train" and self.path is not None:
                records[0] += 1
                if records[0] == n:
                    os.kill(os.getpid(), sig)

        metric_log.MetricLog.log = log_then_signal
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
