"""Data parallelism: two CPU processes (gloo) give the same training as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.train import fit
from tests.integration.ddp_setup import config, data, model, objective, teacher

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    launch([str(ROOT / "tests" / "integration" / "ddp_worker.py"), str(out)], tmp_path)
    single = fit(model(), data(), objective(), config(), teacher=teacher(), seed=11, progress=False)
    ddp_state = load_file(str(out))
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ddp_state[name], value, atol=1e-5), name
    ddp_losses = json.loads((tmp_path / "ddp.safetensors.losses").read_text())
    assert ddp_losses == pytest.approx(single.last_losses, rel=1e-5)
