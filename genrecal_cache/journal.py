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

Long because the protocol is one piece (open/resume, commits, consolidation at close, the directory
lock): split, its ordering rules would be spread over several files.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import COMMIT_SECONDS
from .format.layout import ROW_GROUP_IMAGE_BYTES, ROW_GROUP_ROWS, SAMPLES_SCHEMA
from .format.manifest import (
    COMMITS_DIR, FEATURES_NAME, HEAD_NAME, MANIFEST_NAME, PROGRESS_NAME, SAMPLES_NAME, Counts, identity_diff,
    sha256_file,
)
from .io.durable import fsync_path, rename_durable, write_synced

__all__ = ["KILL_POINTS", "CacheWriteError", "Committed", "DirLock", "DirLockedError", "Journal", "is_journal",
           "kill_point", "rerun_advice"]

LOCK_NAME = "_lock"  # flock'ed by the extraction writing the directory (see DirLock)
JOURNAL_NAMES = (PROGRESS_NAME, PROGRESS_NAME + ".tmp", COMMITS_DIR, LOCK_NAME)
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


def write_durable(path: Path, data: bytes) -> str:
    """Write a new file, fsync it and its directory; returns its sha256."""
    write_synced(path, data)
    fsync_path(path.parent)
    return hashlib.sha256(data).hexdigest()


def write_progress(out_dir: Path, progress: dict[str, Any]) -> None:
    """Replace `_progress.json` atomically: this rename is the commit point."""
    path, tmp = out_dir / PROGRESS_NAME, out_dir / (PROGRESS_NAME + ".tmp")
    data = json.dumps(progress, indent=1, sort_keys=True).encode()
    write_synced(tmp, data)
    kill_point("progress-tmp")
    rename_durable(tmp, path)


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


def _same_spelling(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` with a local teacher folder as its resolved path: `teacher`, `./teacher` and `/abs/teacher`
    are one teacher to a resume (hub ids stay as they are; the config's sha256 is compared separately).
    Applied to both sides, so a journal written before this rule resumes too."""
    teacher = dict(identity.get("teacher") or {})
    if isinstance(teacher.get("id"), str) and Path(teacher["id"]).exists():
        teacher["id"] = str(Path(teacher["id"]).resolve())
    return {**identity, "teacher": teacher}


def rerun_advice(progress: dict[str, Any]) -> str:
    """How to finish the unfinished cache `progress` describes: re-run the command that began it (a merge's
    or an extraction's; journals written before the command was kept were extractions)."""
    command = progress.get("command")
    if isinstance(command, str) and command:
        return f"run the same command again: {command}"
    return "CacheWriter(resume=True); CLI: run the same `genrecal-cache extract` again"


def is_journal(rel: str) -> bool:
    """Whether a path relative to the cache root belongs to the journal (not to the cache)."""
    return rel.split("/", 1)[0] in JOURNAL_NAMES


class CacheWriteError(RuntimeError):
    """Writing the cache failed (raised in the caller, also for failures in the writer thread)."""


class DirLockedError(RuntimeError):
    """The directory cannot be taken for writing: another live process writes it, or it cannot be made there."""


class DirLock:
    """Exclusive use of a directory by one writer (a cache's extraction, a training run): `fcntl.flock` on
    `<dir>/_lock`.

    Two extractions into one folder would delete each other's committed shards. The kernel drops a
    flock when its holder dies, however it dies, so a lock left by a killed run is simply taken over;
    the file's content (pid, host, start time) is only for the message. The file is removed on
    release once the directory holds a complete cache (a manifest), so finished caches carry none.
    """

    def __init__(self, out_dir: str | os.PathLike, what: str = "extraction",
                 advice: str = "wait for it to finish (re-running then resumes or returns the finished cache) or "
                               "choose another output directory", done_marker: str | None = MANIFEST_NAME):
        """`what` writes the directory and `advice` is what to do instead (both for the refusal's message);
        the lock file is removed on release once `done_marker` exists there (None: it is kept)."""
        self.path = Path(out_dir) / LOCK_NAME
        self.what, self.advice, self.done_marker = what, advice, done_marker
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file in the way, a read-only place, no permission (a full disk stays itself)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DirLockedError(f"{self.path.parent}: cannot be the {self.what}'s folder ({e.strerror or e}"
                                 f"{': ' + e.filename if e.filename else ''}); give a folder this user can create "
                                 f"and write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise DirLockedError(f"{self.path.parent} is being written by another {self.what} ({holder}); "
                                 f"{self.advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self.done_marker and (self.path.parent / self.done_marker).exists():  # complete: unlinked while held
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Committed:
    """The writer's state that a commit makes durable, and that a resume gives back."""
    counts: Counts
    written: int                    # tokens in shard files (a multiple of shard_tokens until close)
    shards: dict[str, str]          # features.zarr key -> sha256 of every file written (zarr.json included)
    pending: dict[str, np.ndarray] = field(default_factory=dict)  # committed tokens not in a shard file yet


class Journal:
    """The commit protocol of one `CacheWriter` (writer.py) in `out_dir`: opening or resuming the
    directory, commits, and consolidating the committed rows at close. The writer hands it the rows
    it writes (`add_row`) and, at each commit, its state (`Committed`); nothing else is shared.

    Opening checks the directory (fresh, or an unfinished run with the same `identity`), saves `head`
    and, when resuming, drops everything the last commit does not hold; `resumed` is then that commit.
    """

    def __init__(self, out_dir: Path, identity: dict[str, Any], head: Any, *, resume: bool,
                 commit_seconds: float | None = None, command: str = "") -> None:
        """`command`: what writes the cache (`genrecal-cache extract ...`, `... merge ...`), kept in the journal
        so that messages about an unfinished cache name the command that finishes it."""
        self.out_dir = out_dir
        self.command = command
        self.commit_seconds = COMMIT_SECONDS if commit_seconds is None else commit_seconds
        self.rows: list[dict[str, Any]] = []  # rows written since the last commit
        self.row_image_bytes = 0
        self.committed_ids: list[str] = []    # ids of the samples a resumed run already holds, in order
        self.resumed: Committed | None = None
        self._seq, self._pending_file, self._last_commit = 0, None, 0.0
        self._committed_shards: set[str] = set()
        self._committed_written = 0
        progress = self._open(identity, head, resume)
        if progress is not None:
            try:
                self.resumed = self._restore(progress)
            except ValueError as e:
                raise CacheWriteError(str(e)) from e

    # ---- start: fresh or resumed --------------------------------------------------------------
    def _open(self, identity: dict[str, Any], head: Any, resume: bool) -> dict[str, Any] | None:
        """Create the directory (fresh) or check that it can be resumed; saves the head. Returns the
        last commit when resuming, else None."""
        out = self.out_dir
        if (out / MANIFEST_NAME).exists():
            if resume:  # a crash right after the manifest: the cache is complete, the journal is a leftover
                (out / PROGRESS_NAME).unlink(missing_ok=True)
                shutil.rmtree(out / COMMITS_DIR, ignore_errors=True)
            raise CacheWriteError(f"{out} already holds a complete cache; choose a new directory or delete it first")
        try:
            progress = read_progress(out) if out.exists() else None
        except ValueError as e:
            raise CacheWriteError(str(e)) from e
        leftovers = [p.name for p in out.iterdir() if p.name not in (PROGRESS_NAME + ".tmp", LOCK_NAME)] \
            if out.exists() else []
        # the head's temporary file, and the temporary file safetensors writes beside it (name + ".tmpXXXXXX")
        head_tmps = [n for n in leftovers if n.startswith(HEAD_NAME + ".tmp")]
        if progress is None and set(leftovers) <= {COMMITS_DIR, *head_tmps} \
                and not any((out / COMMITS_DIR).glob("*")):
            # killed before the first progress file: nothing was committed, only our own start-up files exist
            shutil.rmtree(out / COMMITS_DIR, ignore_errors=True)
            for name in head_tmps:
                (out / name).unlink(missing_ok=True)
            leftovers = []
        if progress is None and leftovers:
            raise CacheWriteError(f"{out} already holds files of an unfinished run ({', '.join(sorted(leftovers)[:4])}) "
                                  f"but no {PROGRESS_NAME} to resume from; choose a new directory or delete it first")
        if progress is not None and not resume:
            raise CacheWriteError(f"{out} already holds files of an unfinished run ({progress['counts']['samples']} "
                                  f"samples committed); resume it ({rerun_advice(progress)}) or delete the directory")
        out.mkdir(parents=True, exist_ok=True)
        (out / COMMITS_DIR).mkdir(exist_ok=True)
        tmp = out / (HEAD_NAME + ".tmp")
        head.save(str(tmp))
        self._identity = {**_same_spelling(identity), "head_sha256": sha256_file(str(tmp))}
        if progress is None:
            write_progress(out, self._progress(Committed(dict.fromkeys(Counts.__annotations__, 0), 0, {})))
        else:
            diff = [f"{k}: was {was!r:.120}, now {now!r:.120}"
                    for k, was, now in identity_diff(_same_spelling(progress["identity"]), self._identity)]
            if diff:
                tmp.unlink()
                raise CacheWriteError(f"{out}: cannot resume: this run differs from the one that started the cache "
                                      f"({'; '.join(diff)}). Use the same teacher, tokenizer, hidden codec, top-k and "
                                      f"extraction settings, or a new output directory")
        rename_durable(tmp, out / HEAD_NAME)
        return progress

    def _restore(self, progress: dict[str, Any]) -> Committed:
        """Resume: keep what the last commit holds, delete the rest (shard files written after it, zarr's
        and our temporary files, uncommitted journal files); the writer's state as of that commit.
        The arrays' zarr.json files are kept: the writer rewrites them for the committed length."""
        out = self.out_dir
        self._seq = progress["seq"]
        self._committed_written = progress["written_tokens"]
        records = [self._record(seq) for seq in range(1, self._seq + 1)]
        shards = {k: v for rec in records for k, v in rec["shards"].items()}
        feat = out / FEATURES_NAME
        if feat.exists():
            for p in feat.rglob("*"):
                rel = p.relative_to(feat).as_posix()
                if p.is_file() and rel not in shards and p.name != "zarr.json":
                    p.unlink()
        self._committed_shards = set(shards)
        keep = {f"{seq:08d}.json" for seq in range(1, self._seq + 1)}
        ids: list[str] = []
        for rec in records:
            if rec["rows"]:
                keep.add(rec["rows"])
                path = out / COMMITS_DIR / rec["rows"]
                if hashlib.sha256(path.read_bytes()).hexdigest() != rec["rows_sha256"]:
                    raise ValueError(f"{path}: sha256 mismatch with its commit record; the journal is corrupt, "
                                     f"delete {out} and extract again")
                ids += pq.read_table(path, columns=["id"]).column("id").to_pylist()
        if len(ids) != progress["counts"]["samples"]:
            raise ValueError(f"{out}: the journal's parts hold {len(ids)} rows but {PROGRESS_NAME} counts "
                             f"{progress['counts']['samples']}; delete {out} and extract again")
        self.committed_ids = ids
        self._pending_file = progress["pending"]
        pending = {}
        if self._pending_file:
            keep.add(self._pending_file["file"])
            pending = load_pending(out / COMMITS_DIR / self._pending_file["file"], self._pending_file["sha256"])
        for p in (out / COMMITS_DIR).iterdir():
            if p.name not in keep:
                p.unlink()
        for name in (SAMPLES_NAME, SAMPLES_NAME + ".tmp", MANIFEST_NAME + ".tmp", PROGRESS_NAME + ".tmp"):
            (out / name).unlink(missing_ok=True)
        fsync_path(out / COMMITS_DIR)
        return Committed(dict(progress["counts"]), progress["written_tokens"], shards, pending)

    def _record(self, seq: int) -> dict[str, Any]:
        path = self.out_dir / COMMITS_DIR / f"{seq:08d}.json"
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: commit record missing or unreadable ({e}); the journal is corrupt, delete "
                             f"{self.out_dir} and extract again") from e

    # ---- commits ------------------------------------------------------------------------------------
    def add_row(self, row: dict[str, Any]) -> None:
        """A samples.parquet row, committed by the next commit (or written at close)."""
        self.rows.append(row)
        self.row_image_bytes += sum(len(b) for b in row["images"])

    def _progress(self, state: Committed) -> dict[str, Any]:
        return {"version": PROGRESS_VERSION, "identity": self._identity, "seq": self._seq, "command": self.command,
                "counts": dict(state.counts), "written_tokens": state.written, "pending": self._pending_file}

    def due(self, written: int) -> bool:
        """After a sample is written: commit when a shard was written since the last commit (and
        `commit_seconds` have passed), or when many rows wait (long runs of error rows)."""
        shard_done = written > self._committed_written
        many_rows = len(self.rows) >= 16 * ROW_GROUP_ROWS or self.row_image_bytes >= 4 * ROW_GROUP_IMAGE_BYTES
        return (shard_done and time.monotonic() - self._last_commit >= self.commit_seconds) or many_rows

    def commit(self, state: Committed) -> None:
        """Make durable, in order: the shard files written since the last commit, the rows since then,
        the pending tokens, the commit record, then `_progress.json` (the commit point)."""
        out, seq = self.out_dir, self._seq + 1
        feat = out / FEATURES_NAME
        new = {k: v for k, v in state.shards.items() if not k.endswith("zarr.json") and k not in self._committed_shards}
        for key in new:
            fsync_path(feat / key)
        for d in {(feat / key).parent for key in new}:
            fsync_path(d)
        kill_point("shards-synced")
        rec: dict[str, Any] = {"rows": None, "rows_sha256": None, "n_rows": len(self.rows), "shards": new}
        if self.rows:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(self.rows, schema=SAMPLES_SCHEMA), sink, compression="zstd")
            rec["rows"] = f"rows-{seq:08d}.parquet"
            rec["rows_sha256"] = write_durable(out / COMMITS_DIR / rec["rows"], sink.getvalue().to_pybytes())
        kill_point("rows-written")
        old_pending, self._pending_file = self._pending_file, None
        if state.pending:
            name = f"pending-{seq:08d}.npz"
            sha = save_pending(out / COMMITS_DIR / name, state.pending)
            self._pending_file = {"file": name, "tokens": len(next(iter(state.pending.values()))), "sha256": sha}
        kill_point("pending-written")
        write_durable(out / COMMITS_DIR / f"{seq:08d}.json", json.dumps(rec).encode())
        self._seq = seq
        write_progress(out, self._progress(state))
        kill_point("committed")
        if old_pending:
            (out / COMMITS_DIR / old_pending["file"]).unlink(missing_ok=True)
        self._committed_shards.update(new)
        self._committed_written = state.written
        self.rows, self.row_image_bytes = [], 0
        self._last_commit = time.monotonic()

    # ---- close --------------------------------------------------------------------------------------
    def consolidate(self) -> None:
        """samples.parquet from the committed parts + the rows not committed yet, in row groups of up to
        ROW_GROUP_ROWS rows (cut early at ROW_GROUP_IMAGE_BYTES of images): the same file whether or
        not the run was interrupted. Written to a temporary name, fsynced, renamed."""
        out = self.out_dir
        tmp = out / (SAMPLES_NAME + ".tmp")
        writer = pq.ParquetWriter(str(tmp), SAMPLES_SCHEMA, compression="zstd")
        group: list[dict[str, Any]] = []
        nbytes = 0

        def rows() -> Any:
            for seq in range(1, self._seq + 1):
                rec = self._record(seq)
                if rec["rows"]:
                    yield from pq.read_table(out / COMMITS_DIR / rec["rows"], schema=SAMPLES_SCHEMA).to_pylist()
            yield from self.rows

        for row in rows():
            group.append(row)
            nbytes += sum(len(b) for b in row["images"])
            if len(group) >= ROW_GROUP_ROWS or nbytes >= ROW_GROUP_IMAGE_BYTES:
                writer.write_table(pa.Table.from_pylist(group, schema=SAMPLES_SCHEMA), row_group_size=len(group))
                group, nbytes = [], 0
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=SAMPLES_SCHEMA), row_group_size=len(group))
        writer.close()
        fsync_path(tmp)
        rename_durable(tmp, out / SAMPLES_NAME)
        kill_point("consolidated")

    def remove(self) -> None:
        """After the manifest is in place: the journal is no longer needed."""
        kill_point("manifest-written")
        (self.out_dir / PROGRESS_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / COMMITS_DIR, ignore_errors=True)
        fsync_path(self.out_dir)
