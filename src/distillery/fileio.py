"""Durable file writes and checksummed folders: the bottom layer every writer of the run folder,
the checkpoints and the teacher cache uses.

* :func:`write_atomic` / :func:`replace_durable`: write beside the target, ``fsync`` the file, rename
  it into place, ``fsync`` the directory -- after a crash or power loss a reader sees the old file
  or the new one, never a mixture.
* :func:`write_manifest` / :func:`verify_manifest`: a ``MANIFEST.json`` holding the sha256 and size
  of every other file of a folder, written last; a folder whose manifest is missing or disagrees with
  its files is damaged, and the error names the file.
* :data:`HOOKS`: test hooks called between writing a temporary file or folder and renaming it into
  place, and after each process's shard of a sharded checkpoint is written (the fault suite stops a
  process exactly there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

MANIFEST = "MANIFEST.json"

# name -> callables run with the temporary path just before it is renamed into place ("before_rename"),
# or once this process's shard is in a sharded checkpoint's temporary folder ("after_shard"). Empty in
# normal use; the fault-injection tests add one to kill the process inside a write.
HOOKS: dict[str, list[Callable[[Path], None]]] = {"before_rename": [], "after_shard": []}


class DamagedFileError(Exception):
    """A file of a checksummed folder is missing, truncated or altered (``path`` names it)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_tree(path: Path) -> None:
    """``fsync`` every file of a folder and the folder itself (before renaming it into place)."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)


def replace_durable(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file or folder onto ``final`` and make the rename durable."""
    for hook in HOOKS["before_rename"]:
        hook(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(tmp, mode) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    replace_durable(tmp, path)


# Below this many free bytes, a failed write is taken for a full disk.
LOW_SPACE = 1 << 20


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Report a full disk as ``OSError(ENOSPC)`` naming ``path``, whatever the writer raised.

    ``torch.save`` and safetensors report a write that hit a full disk as a ``RuntimeError`` or their
    own error type; inside this block such an error, when the disk holding ``path`` has (almost) no
    space left, becomes the ``OSError`` the command line reports as a full disk.
    """
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        try:
            free = shutil.disk_usage(Path(path) if Path(path).is_dir() else Path(path).parent).free
        except OSError:
            raise exc from None
        if free < LOW_SPACE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    """Checksum every file under ``folder`` (the manifest itself aside) into ``folder/MANIFEST.json``.

    Call it last, once every other file is complete: a folder without a manifest was never finished.
    """
    folder = Path(folder)
    files = _checksums(folder)
    path = folder / MANIFEST
    with open(path, "w") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return files


def _checksums(folder: Path) -> dict[str, dict[str, int | str]]:
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not _is_atomic_temp(p.name)
    }


def _is_atomic_temp(name: str) -> bool:
    """A leftover of :func:`write_atomic` stopped before its rename (``.<name>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def add_to_finished(folder: Path, name: str, text: str) -> None:
    """Add the file ``name`` to a finished (manifested) ``folder``: the file is written atomically,
    then the manifest is rewritten atomically with it. A reader in between, or after a crash in
    between, sees the old manifest, which does not list the new file: the folder stays intact."""
    folder = Path(folder)
    verify_manifest(folder)  # never bless a damaged folder's files with fresh checksums
    write_atomic(folder / name, text)
    write_atomic(
        folder / MANIFEST, json.dumps({"format": 1, "files": _checksums(folder)}, indent=1, sort_keys=True)
    )


def verify_manifest(folder: Path) -> None:
    """Raise :class:`DamagedFileError` naming the first file of ``folder`` that is missing or differs
    from its manifest entry (or the manifest, when it is missing or unreadable)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DamagedFileError(path, "the checksum manifest is missing (the folder was never completed)")
    try:
        files = json.loads(path.read_text())["files"]
        entries = {str(k): (str(v["sha256"]), int(v["bytes"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedFileError(path, "the checksum manifest is not readable") from None
    for rel, (sha, size) in sorted(entries.items()):
        p = folder / rel
        if not p.is_file():
            raise DamagedFileError(p, "missing")
        if p.stat().st_size != size:
            raise DamagedFileError(p, f"{p.stat().st_size} bytes where {size} were written (truncated?)")
        if sha256_file(p) != sha:
            raise DamagedFileError(p, "its sha256 checksum does not match the one written with it")


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local file or directory rather than a Hugging Face hub id: it
    exists, or it looks like a path (absolute, ``./``, ``~``, a trailing ``/``, more than one ``/``, or
    ``dir/name`` under an existing ``dir``).

        >>> is_local_source("/no/such/dir"), is_local_source("./model"), is_local_source("gpt2")
        (True, True, False)
        >>> is_local_source("HuggingFaceTB/SmolLM2-135M")
        False
    """
    path = Path(source).expanduser()
    if path.exists():
        return True
    s = str(source)
    if path.is_absolute() or s.startswith((".", "~")) or s.endswith("/") or "\\" in s or s.count("/") > 1:
        return True
    return "/" in s and path.parent.is_dir()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (hub and loader errors run over several lines)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


def is_finite_tree(tensors) -> bool:
    """Whether every floating tensor of an iterable of tensors is finite (no NaN, no infinity)."""
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


__all__ = [
    "HOOKS",
    "MANIFEST",
    "DamagedFileError",
    "disk_errors",
    "first_line",
    "fsync_dir",
    "fsync_tree",
    "is_finite_tree",
    "is_local_source",
    "replace_durable",
    "sha256_file",
    "verify_manifest",
    "write_atomic",
    "write_manifest",
]
