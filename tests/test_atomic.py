"""Atomic writes: the content arrives whole, no temporary file is left, and a write that fails midway
leaves an existing file untouched."""

from __future__ import annotations

import json
import os

import pytest

from jaxlora.atomic import atomic_open, atomic_write, atomic_write_json


def test_bytes_text_and_json_are_written(tmp_path):
    assert atomic_write(tmp_path / "b.bin", b"\x00\xffdata") == tmp_path / "b.bin"
    atomic_write(tmp_path / "t.txt", "grüße\n")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]}, indent=2)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xffdata"
    assert (tmp_path / "t.txt").read_bytes() == "grüße\n".encode()
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "j.json", "t.txt"]  # no temporary files


def test_replaces_an_existing_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    atomic_write(path, "new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_serialization_error_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"old": true}')
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_missing_directory_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "f.txt", "x")
    assert list(tmp_path.iterdir()) == []
