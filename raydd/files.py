"""Whole-file writes: a reader sees the old file or the new one, never half of one.

``atomic_write``: a local file via a temp file in the same directory (unique name, fsync) and
``os.replace`` (``atomic_write_with``: the content streamed by a writer). ``write_whole``: the same on a local pyarrow filesystem, one PUT on an object store
(atomic there). Used for synthetic sets and checkpoints, store claims, leaderboards and a sweep's
saved decisions.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import pyarrow.fs as pafs


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """``atomic_write`` for content that ``write`` streams into the open temp file (no copy in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_whole(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    if isinstance(filesystem, pafs.LocalFileSystem):
        atomic_write(path, data)
        return
    with filesystem.open_output_stream(path) as out:
        out.write(data)
