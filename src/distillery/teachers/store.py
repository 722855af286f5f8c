"""On-disk cache of trained teachers, keyed by a hash of everything that determines them.

The key covers the teacher's config, its data and seed (given by the task), the version of torch,
and a fingerprint of distillery's own code (:func:`training_code_version`): any change to the code
that trains a teacher makes a new key, so a teacher trained by older code is never reused.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

# Bump when the layout of a cache entry changes.
CACHE_FORMAT = 2

# Modules that only read or report results and cannot change a trained teacher: edits to them keep
# cached teachers valid. Everything else of the package is part of the fingerprint.
OUTPUT_ONLY = ("cli.py", "report", "theory", "experiment/summary.py", "experiment/evaluate.py")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
            ):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def training_code_version(root: Path | None = None) -> str:
    """A short hash of the code of the ``distillery`` package at ``root`` (default: this one, computed
    once per process).

    Read from each module's syntax tree with docstrings removed, so comments, docstrings and
    formatting do not count, while any change to what the code does does. The modules in
    :data:`OUTPUT_ONLY` are left out.
    """
    if root is None:
        return _this_package_version()
    return _fingerprint(Path(root))


@functools.cache
def _this_package_version() -> str:
    return _fingerprint(Path(__file__).resolve().parents[1])


def _fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(rel == skip or rel.startswith(skip + "/") for skip in OUTPUT_ONLY):
            continue
        tree = _without_docstrings(ast.parse(path.read_text(encoding="utf-8")))
        digest.update(rel.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    env = os.environ.get("DISTILLERY_CACHE")
    if env:
        return Path(env).expanduser() / "teachers"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "teachers"


def config_hash(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable description."""
    text = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_key(payload: dict[str, Any]) -> str:
    """The cache key of a trained teacher: ``payload`` (what the task says determines it), the torch
    version and the training code's fingerprint."""
    return config_hash({**payload, "torch": torch.__version__, "code": training_code_version()})


class TeacherStore:
    """``root/<hash>/{model.safetensors, meta.json}``; entries are written to a temporary directory
    and renamed into place, so a crash never leaves a half-written teacher."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.path(key) / "meta.json").is_file() and (self.path(key) / "model.safetensors").is_file()

    def load(self, key: str, model: nn.Module) -> dict[str, Any]:
        """Load weights into ``model``; return the stored metadata."""
        load_model(model, str(self.path(key) / "model.safetensors"))  # handles tied (shared) weights
        return json.loads((self.path(key) / "meta.json").read_text())

    def save(self, key: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-"))
        try:
            save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            final = self.path(key)
            if final.exists():  # another process won the race; keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path(key)
