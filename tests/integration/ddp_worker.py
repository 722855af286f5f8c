"""Run by tests/integration/test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo)."""

import json
import sys

import torch
from safetensors.torch import save_model

from distillery.train import fit, make_accelerator
from tests.integration.ddp_setup import config, data, model, objective, teacher


def main(out_path: str) -> None:
    acc = make_accelerator()
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    assert torch.distributed.get_backend() == "gloo"
    result = fit(
        model(), data(), objective(), config(), teacher=teacher(), seed=11, accelerator=acc, progress=False
    )
    save_result(acc, result, out_path)


def save_result(acc, result, out_path: str) -> None:
    """The main process writes the trained student to ``out_path`` and its last losses beside it."""
    if acc.is_main_process:
        save_model(result.model, out_path)
        with open(out_path + ".losses", "w") as fh:
            fh.write(json.dumps(result.last_losses))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
