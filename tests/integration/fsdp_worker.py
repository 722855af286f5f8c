"""Run by tests/integration/test_fsdp.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

    python fsdp_worker.py OUT PARALLEL [RUN_DIR [STOP_AT|resume]]

Trains the tiny problem of ``ddp_setup`` with ``train.parallel=PARALLEL``; the main process writes the
trained student to OUT, its last losses to OUT.losses and, per process, the teacher's and the student's
parameters held locally during training to OUT.rank<r>.json. With RUN_DIR, checkpoints every 5 steps
there (two kept); STOP_AT stops both processes after that step (an exception, as a crash would), ``resume``
continues from the newest checkpoint.
"""

import json
import sys

from distillery.train import fit, make_accelerator
from distillery.train.fsdp import local_numel
from tests.integration.ddp_setup import config, data, model, objective, teacher
from tests.integration.ddp_worker import save_result


class Stop(Exception):
    pass


def main(out_path: str, parallel: str, run_dir: str | None = None, action: str | None = None) -> None:
    acc = make_accelerator()
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    cfg = config().model_copy(
        update={"parallel": parallel, "checkpoint_every": 5 if run_dir else None, "keep_checkpoints": 2}
    )
    t, student = teacher(), model()
    seen = {"teacher_total": local_numel(t.module), "student_total": local_numel(student)}

    def on_step(step: int) -> None:
        seen["teacher_local"] = local_numel(t.module)
        seen["student_local"] = local_numel(student)
        if action is not None and action.isdigit() and step == int(action):
            raise Stop(f"stopped after step {step}")

    try:
        result = fit(
            student, data(), objective(), cfg, teacher=t, seed=11, accelerator=acc, progress=False,
            run_dir=run_dir, resume=action == "resume", on_step=on_step,
        )  # fmt: skip
    except Stop:  # both processes stop after the same step; leave together
        acc.wait_for_everyone()
        return
    seen["teacher_after"] = local_numel(t.module)
    seen["student_after"] = local_numel(result.model)
    seen["resumed_from"] = result.resumed_from
    with open(f"{out_path}.rank{acc.process_index}.json", "w") as fh:
        json.dump(seen, fh)
    save_result(acc, result, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
