"""Crash-safe commits of an extraction in progress: `_progress.json` + `_commits/` (spec: docs/cache-format.md,
"Commit protocol").

While a `CacheWriter` runs, the cache directory holds, next to the (growing) feature arrays:

    _progress.json              the last commit, replaced atomically (tmp + fsync + rename + fsync dir)
    _commits/rows-<seq>.parquet the samples.parquet rows committed by commit <seq> (write-once)
    _commits/pending-<seq>.npz  tokens of committed samples that are not in a shard file yet (the tail of
                                the last committed sample: shards are written whole, once)

A commit makes durable, in this order: the shard files written since the last commit (fsync), the
rows part, the pending tokens, then `_progress.json` (the commit point). A sample is committed, and
survives a crash, once a `_progress.json` counting it is in place. On restart the writer keeps exactly
what the last commit describes and deletes the rest (see `CacheWriter(resume=True)`). At close the
parts become `samples.parquet`, the manifest is written (last, atomically), and this journal is removed.

Tests inject crashes with the environment variable `GENRECAL_KILL_AT="<point>:<n>"`: the process
SIGKILLs itself the n-th time (1-based) it reaches the named point (see `KILL_POINTS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

PROGRESS_NAME = "_progress.json"
COMMITS_DIR = "_commits"
JOURNAL_NAMES = (PROGRESS_NAME, PROGRESS_NAME + ".tmp", COMMITS_DIR)
PROGRESS_VERSION = 1

# Named points of the commit sequence where a test can kill the process (GENRECAL_KILL_AT).
KILL_POINTS = ("flush-array",       # between two arrays of one shard flush
               "shards-synced",     # shard files durable, nothing else of the commit yet
               "rows-written",      # rows part durable, progress not yet
               "pending-written",   # pending tokens durable, progress not yet
               "progress-tmp",      # _progress.json.tmp durable, not renamed
               "committed",         # progress renamed, old pending file not yet deleted
               "consolidated",      # close: samples.parquet in place, no manifest yet
               "manifest-written")  # close: manifest in place, journal not yet removed
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if GENRECAL_KILL_AT names this point (fault-injection tests)."""
    spec = os.environ.get("GENRECAL_KILL_AT")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so that the names created in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> str:
    """Write a new file, fsync it and its directory; returns its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)
    return hashlib.sha256(data).hexdigest()


def write_progress(out_dir: Path, progress: dict[str, Any]) -> None:
    """Replace `_progress.json` atomically: this rename is the commit point."""
    path, tmp = out_dir / PROGRESS_NAME, out_dir / (PROGRESS_NAME + ".tmp")
    data = json.dumps(progress, indent=1, sort_keys=True).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    kill_point("progress-tmp")
    os.replace(tmp, path)
    fsync_path(out_dir)


def read_progress(out_dir: Path) -> dict[str, Any] | None:
    """The last commit in `out_dir`, or None when there is none; a corrupt file raises ValueError."""
    path = out_dir / PROGRESS_NAME
    if not path.exists():
        return None
    try:
        progress = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # cannot happen with the atomic rename
        raise ValueError(f"{path}: unreadable ({e}); the extraction journal is corrupt, delete {out_dir} "
                         f"and extract again") from e
    if not isinstance(progress, dict) or progress.get("version") != PROGRESS_VERSION:
        raise ValueError(f"{path}: journal version {progress.get('version') if isinstance(progress, dict) else '?'} "
                         f"is not {PROGRESS_VERSION}: it was written by another genrecal release; resume with that "
                         f"release, or delete {out_dir} and extract again")
    return progress


def save_pending(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Tokens not yet in a shard file, as .npz (no pickle); durable; returns the sha256."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_durable(path, buf.getvalue())


def load_pending(path: Path, sha256: str) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 mismatch with {PROGRESS_NAME}; the journal is corrupt, delete the "
                         f"directory and extract again")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def identity_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between the identity a run was started with and the current one."""
    return [f"{k}: was {stored.get(k)!r:.120}, now {current.get(k)!r:.120}"
            for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


def is_journal(rel: str) -> bool:
    """Whether a path relative to the cache root belongs to the journal (not to the cache)."""
    return rel.split("/", 1)[0] in JOURNAL_NAMES
