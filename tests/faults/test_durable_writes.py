"""Durable writes: the file's bytes and then the folder's entry reach the disk around the rename."""

from __future__ import annotations

import json
import os
import stat

import pytest

from distillery import fileio


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.write_atomic(tmp_path / "result.json", "{}")
    assert events == [("fsync", "file"), ("rename", "result.json"), ("fsync", "dir")]
    assert (tmp_path / "result.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_a_folder_is_fsynced_file_by_file_and_renamed_whole(tmp_path, monkeypatch):
    tmp = tmp_path / ".entry.tmp"
    tmp.mkdir()
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "b.bin").write_bytes(b"b")
    fileio.write_manifest(tmp)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        fileio.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    fileio.fsync_tree(tmp)
    fileio.replace_durable(tmp, tmp_path / "entry")
    assert {os.path.basename(p) for p in synced} >= {
        "a.bin",
        "b.bin",
        "MANIFEST.json",
        ".entry.tmp",
        tmp_path.name,
    }
    fileio.verify_manifest(tmp_path / "entry")


def test_a_file_added_to_a_finished_folder_is_checksummed_and_a_stop_in_between_leaves_it_intact(
    tmp_path, monkeypatch
):
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    fileio.write_manifest(folder)
    renames: list[str] = []

    def stop_at_manifest(src, dst):
        renames.append(os.path.basename(dst))
        if os.path.basename(dst) == fileio.MANIFEST:
            raise KeyboardInterrupt  # the process stops after the card, before the new manifest
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", stop_at_manifest)
    try:
        fileio.add_to_finished(folder, "README.md", "# card")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert renames == ["README.md", fileio.MANIFEST]
    fileio.verify_manifest(folder)  # the old manifest, without the card: still intact
    fileio.add_to_finished(folder, "README.md", "# card, again")
    fileio.verify_manifest(folder)
    files = json.loads((folder / fileio.MANIFEST).read_text())
    assert set(files["files"]) == {"README.md", "model.safetensors"}  # the leftover temp file is not listed
    (folder / "README.md").write_text("# edited by hand")
    with pytest.raises(fileio.DamagedFileError, match="README.md"):
        fileio.verify_manifest(folder)
    with pytest.raises(fileio.DamagedFileError):  # a damaged folder's files are not blessed with new sums
        fileio.add_to_finished(folder, "NOTES.md", "x")
