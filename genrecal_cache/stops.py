"""A long run (extract, merge) that stops early, reported in one line: a full disk or an interrupt (SIGINT,
SIGTERM) names the folder, the sample reached, what the last commit keeps, and the command that resumes.

What was committed survives any stop (journal.py); re-running the same command resumes from there. The
CLI turns SIGTERM into `Interrupted` (`raise_on_signals`), so both signals unwind the run like Ctrl-C:
the writer thread is stopped, the folder lock released, and `stopped_runs` writes the line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format.manifest import PROGRESS_NAME

__all__ = ["DISK_FULL_ERRNOS", "Interrupted", "Position", "RunStopped", "command_line", "disk_full",
           "raise_on_signals", "stopped_runs", "torchrun_command"]

# what a full disk looks like: no space, a file over the size limit (RLIMIT_FSIZE, a file system's
# largest file), a quota
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class RunStopped(Exception):
    """A run stopped early (full disk, interrupt); the message says what is kept and how to resume.
    `exit_code`: 2 for a full disk, 128 + the signal number for an interrupt (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """A signal asking the run to stop (SIGTERM as SIGINT): unwinds like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while inside (a CLI command's body)."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Position:
    """How far a run got: samples handed to its writer (resumed ones included); None before the first."""
    samples: int | None = None


def command_line(program: str = "genrecal-cache", script: str = "cache_cli.py") -> str:
    """This process's command line, as a user re-types it: under torchrun the torchrun command that started it
    (`torchrun_command`), else `program ...` for the CLI however started (its entry point or `script`)."""
    argv = torchrun_command() or list(sys.argv) or ["python"]
    if Path(argv[0]).name in (program, script):
        argv[0] = program
    return shlex.join(argv)


def torchrun_command() -> list[str] | None:
    """Under torchrun, the command line that started it, as it was given (`torchrun ARGS` or `python -m
    torch.distributed.run ARGS`): its agent is this worker's parent process. None elsewhere, and where that
    cannot be read (not Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]]
    except (OSError, UnicodeDecodeError):
        return None
    for i, a in enumerate(argv[:3]):
        if Path(a).name == "torchrun":  # the console script (run through its shebang: python first)
            return argv[i:]
        if a == "-m" and argv[i + 1:i + 2] == ["torch.distributed.run"]:
            return argv
    return None


def disk_full(e: BaseException) -> str | None:
    """Why `e` (or an exception it was raised from) is a full disk ("No space left on device", ...), else None.
    Libraries that wrap the OS error in their own (safetensors, pyarrow) keep its text, so that is matched too."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return os.strerror(cur.errno)
        text = str(cur).lower()  # Rust's io::Error (safetensors) reads "File too large (os error 27)"
        if found := next((n for n in DISK_FULL_ERRNOS
                          if os.strerror(n).lower() in text or f"os error {n})" in text), None):
            return os.strerror(found)
        cur = cur.__cause__ or cur.__context__
    return None


def _kept(out: Path) -> str:
    try:
        progress = json.loads((out / PROGRESS_NAME).read_bytes())
        n = int(progress["counts"]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return "nothing was committed yet"
    return f"the {n} sample(s) committed are kept" if n else "nothing was committed yet"


@contextlib.contextmanager
def stopped_runs(out: str | os.PathLike, what: str, command: str | None = None) -> Iterator[Position]:
    """Around a run writing `out`: an interrupt or a full disk becomes `RunStopped` with one line. The run
    updates the yielded `Position` as it goes; `what` names it ("extraction", "merge")."""
    out, pos = Path(out), Position()
    rerun = f"run the same command again to resume: {command or command_line()}"
    try:
        yield pos
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        at = "before its first sample" if pos.samples is None else f"at sample {pos.samples}"
        raise RunStopped(f"{out}: {what} interrupted ({signal.Signals(signum).name}) {at}; {_kept(out)}; {rerun}",
                         128 + signum) from e
    except Exception as e:
        why = disk_full(e)
        if why is None:
            raise
        raise RunStopped(f"{out}: the disk is full ({why}) while writing the {what}; {_kept(out)}; free space and "
                         f"{rerun}", 2) from e
