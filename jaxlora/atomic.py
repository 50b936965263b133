"""Atomic file writes: write to a temporary name in the same directory, fsync, then rename into place.

    atomic_write(path, b"bytes" or "text")
    atomic_write_json(path, {"a": 1}, indent=2)
    with atomic_open(path) as f:        # a binary file; the rename happens when the block ends
        shutil.copyfileobj(src, f)

A reader sees either the old file or the whole new one, never a half-written file: the data is
fsynced before the rename and the directory after it, so a crash at any point leaves the old file or
the new one. If writing fails (the block raises, serialization fails, the disk is full) the temporary
file is removed and an existing file at `path` is left untouched. Only the standard library is used,
so every layer above can write files through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush directory `path`'s entries (e.g. a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file open for writing that replaces `path` when the ``with`` block ends without error.

    The temporary file is ``.<name>.<random>.tmp`` next to `path` (same file system, so the rename is
    atomic), created with the usual permissions (0o666 less the umask).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write `data` (bytes, or text encoded with `encoding`) to `path` atomically; returns `path`."""
    if isinstance(data, str):
        data = data.encode(encoding)
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` written to `path` atomically; returns `path`.

    `obj` is serialized before anything is written, so a serialization error leaves `path` as it was."""
    return atomic_write(path, json.dumps(obj, **dumps_kwargs))


__all__ = ["atomic_open", "atomic_write", "atomic_write_json", "fsync_dir"]
