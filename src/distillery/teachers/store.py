"""On-disk cache of trained teachers, keyed by a hash of everything that determines them.

The key covers the teacher's config, its data and seed (given by the task), the version of torch,
and a fingerprint of distillery's own code (:func:`training_code_version`): any change to the code
that trains a teacher makes a new key, so a teacher trained by older code is never reused.

Layout::

    <root>/<key>/{model.safetensors, meta.json, MANIFEST.json}   one entry (checksummed)
    <root>/.locks/<key>.lock      held (flock) by the process training that key: PID and host inside
    <root>/.damaged/<key>-<time>/ entries that failed their checksums, moved aside, never deleted

An entry is written to a temporary folder, checksummed, flushed and renamed into place, so a crash
never leaves a half-written one; :meth:`TeacherStore.load` checks the checksums before decoding.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from distillery.errors import ConfigError, DistilleryError
from distillery.fileio import (
    DamagedFileError,
    add_to_finished,
    disk_errors,
    fsync_dir,
    fsync_tree,
    replace_durable,
    verify_manifest,
    write_manifest,
)

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: no lock between processes (two runs may train the same teacher)
    fcntl = None

# Bump when the layout of a cache entry changes (3: MANIFEST.json).
CACHE_FORMAT = 3

# Modules that only read or report results and cannot change a trained teacher: edits to them keep
# cached teachers valid. Everything else of the package is part of the fingerprint.
OUTPUT_ONLY = (
    "cli.py",
    "report",
    "theory",
    "experiment/summary.py",
    "experiment/evaluate.py",
    "experiment/cards.py",
)


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


class DamagedTeacherError(DistilleryError):
    """A file of a cached teacher is missing, truncated, altered or does not decode (``path``)."""

    def __init__(self, entry: Path, path: Path, problem: str) -> None:
        super().__init__(
            f"the cached teacher {entry} is damaged: {path}: {problem}. Delete that folder; "
            "`distillery run` moves a damaged teacher aside by itself and trains it again"
        )
        self.entry = entry
        self.path = path
        self.problem = problem


class TeacherStore:
    """The teacher cache under ``root`` (default: :func:`default_cache_root`); see the module
    docstring for its layout. An unusable ``root`` (a file, read-only) is a :class:`ConfigError`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        """Whether an entry exists for ``key`` (:meth:`load` checks that it is intact)."""
        return self.path(key).is_dir()

    def verify(self, key: str) -> None:
        """Raise :class:`DamagedTeacherError` naming the first file of the entry that is missing or
        differs from its checksums."""
        try:
            verify_manifest(self.path(key))
        except DamagedFileError as exc:
            raise DamagedTeacherError(self.path(key), exc.path, exc.problem) from None

    def load(self, key: str, model: nn.Module) -> dict[str, Any]:
        """Check the entry's checksums, load its weights into ``model`` and return its metadata."""
        self.verify(key)
        entry = self.path(key)
        weights, meta = entry / "model.safetensors", entry / "meta.json"
        try:
            load_model(model, str(weights))  # handles tied (shared) weights
        except Exception as exc:  # garbage makes the decoder raise almost anything
            raise DamagedTeacherError(
                entry, weights, f"cannot be read ({type(exc).__name__}: {exc})"
            ) from exc
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise DamagedTeacherError(entry, meta, f"cannot be read ({exc})") from exc

    def save(self, key: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        """Write the entry of ``key`` (weights, metadata, checksums) and rename it into place; if an
        entry appeared meanwhile, keep that one."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-"))
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:
            with disk_errors(tmp):  # a full disk is reported as one, whatever safetensors raises
                save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            write_manifest(tmp)
            fsync_tree(tmp)
            final = self.path(key)
            if final.exists():  # written meanwhile by a process that took no lock; keep theirs
                shutil.rmtree(tmp)
            else:
                replace_durable(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise self._unwritable(exc) from exc
            raise
        return self.path(key)

    def add_card(self, key: str, text: str) -> Path:
        """Write ``README.md`` (the teacher's model card) into the finished entry of ``key`` and add it to
        the entry's checksums; the entry stays loadable whenever the process stops."""
        entry = self.path(key)
        try:
            add_to_finished(entry, "README.md", text)
        except DamagedFileError as exc:
            raise DamagedTeacherError(entry, exc.path, exc.problem) from None
        except OSError as exc:
            raise self._unwritable(exc) from None
        return entry / "README.md"

    def quarantine(self, key: str) -> Path:
        """Move the (damaged) entry of ``key`` to ``root/.damaged/<key>-<time>`` and return that path;
        nothing is deleted."""
        aside = self.root / ".damaged"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = aside / f"{key}-{stamp}"
        n = 1
        while dest.exists():
            dest, n = aside / f"{key}-{stamp}-{n}", n + 1
        try:
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(key), dest)
        except OSError as exc:
            raise self._unwritable(exc) from None
        fsync_dir(self.root)
        return dest

    @contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the lock of ``key`` (``flock`` on ``root/.locks/<key>.lock``) for the ``with`` block.

        If another process holds it, ``on_wait(owner)`` is called first (``owner``: "PID n", plus the
        host when it is another one) and the call blocks until that process releases it (it finishes
        or dies: the system drops the lock of a dead process).
        """
        path = self.root / ".locks" / f"{key}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if on_wait is not None:
                        on_wait(_lock_owner(fd))
                    fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _unwritable(self, exc: OSError) -> ConfigError:
        return ConfigError(
            f"the teacher cache {self.root} is not a writable folder ({exc.strerror or exc}"
            f"{f': {exc.filename}' if exc.filename else ''}); set DISTILLERY_CACHE or the teacher's "
            "cache_dir (teacher.cache_dir=...) to a writable folder, or turn the cache off (teacher.cache=false)"
        )


def _lock_owner(fd: int) -> str:
    """Who holds a lock, from what its holder wrote into the file ("PID unknown" if unreadable)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):  # e.g. read between its truncate and write
        return "PID unknown"
    return f"PID {pid}" + ("" if host == socket.gethostname() else f" on {host}")
