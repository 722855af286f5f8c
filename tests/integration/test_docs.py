"""Every Python block of the README and of ``docs/`` runs as written.

Each fenced ``python`` block runs in a fresh interpreter from the repository root, in a temporary
working directory with a private cache; the blocks of one file run in order in one interpreter
(a later block may use names an earlier one defined, as a reader would). ``DISTILLERY_DOCS_TINY=1``
is set for blocks that want to shrink their sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_the_readme_has_python_blocks_to_check():
    assert len(python_blocks(ROOT / "README.md")) >= 2


@pytest.mark.integration
@pytest.mark.parametrize(
    "path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_python_blocks_run_as_written(path, tmp_path):
    blocks = python_blocks(path)
    script = "\n\n".join(f"# ---- block {i + 1} of {path.name}\n{code}" for i, code in enumerate(blocks))
    (tmp_path / "blocks.py").write_text(script)
    env = {
        **os.environ,
        "DISTILLERY_CACHE": str(tmp_path / "cache"),
        "DISTILLERY_DOCS_TINY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "blocks.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{path.name}: a python block failed\n{proc.stderr[-4000:]}"
