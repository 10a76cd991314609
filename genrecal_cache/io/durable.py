"""The one durable write of the project: data fsynced before a rename makes it visible, and the
directory fsynced after it, so that a crash leaves either the old file or the complete new one.

Used by the cache writer and its journal, training checkpoints, metrics and remote mirrors.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_path", "rename_durable", "write_synced"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so that the names created in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync the file (not its directory: see `rename_durable`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rename_durable(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` over `dst` and fsync the directory: the rename itself must survive a crash."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably (via `<path>.tmp`)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write_synced(tmp, data)
    rename_durable(tmp, path)
