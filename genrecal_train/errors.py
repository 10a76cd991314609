"""The errors the trainer raises for a run that cannot start or go on, and how a stop is told."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = ["Interrupted", "OutOfSpace", "RunRefused", "TrainError", "out_of_space"]


class TrainError(ValueError):
    """A run that cannot start or go on (no usable sample, a non-finite loss, a resume that does not fit
    its checkpoint); the message names the cause and the fix. `genrecal-train` prints it as one line."""


class RunRefused(TrainError):
    """A run refused before it began, for what the user gave (a resume on another cache or with other
    settings than its checkpoint's): a usage error, exit status 2 in `genrecal-train`."""


class OutOfSpace(TrainError):
    """The disk (or quota, or file size limit) ran out while the run wrote to its folder; `saved` is the
    last complete checkpoint (None: none yet), from which `--resume` continues once space is freed."""

    def __init__(self, message: str, saved: Path | None):
        super().__init__(message)
        self.saved = saved


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at `stage`/`step` (steps done in it; stage None: before training
    began); `saved` is the last complete checkpoint, from which `--resume` continues (None: none yet)."""

    def __init__(self, stage: int | None, step: int, saved: Path | None):
        super().__init__(f"interrupted at stage {stage} step {step}")
        self.stage, self.step, self.saved = stage, step, saved


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # disk full, quota exceeded, file size limit (ulimit -f)


def out_of_space(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc` (its causes and contexts) that says the disk, quota or file size limit ran out,
    or None. safetensors (Rust) only names the errno in its message ("... (os error 28)"), torch's zip writer
    keeps the Python file's OSError as its context, DCP lists the ranks' failures."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        m = re.search(r"os error (\d+)", str(e))
        if m and int(m.group(1)) in NO_SPACE:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None

