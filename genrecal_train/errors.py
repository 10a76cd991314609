"""The errors the trainer raises for a run that cannot start or go on, or that stopped part way."""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["OutOfSpace", "RunInterrupted", "RunRefused", "TrainError"]


class TrainError(ValueError):
    """A run that cannot start or go on (no usable sample, a non-finite loss, a resume that does not fit
    its checkpoint); the message names the cause and the fix. `genrecal-train` prints it as one line."""


class RunRefused(TrainError):
    """A run refused before it began, for what the user gave (a resume on another cache or with other
    settings than its checkpoint's): a usage error, exit status 2 in `genrecal-train`."""


class OutOfSpace(TrainError):
    """The disk (or quota, or file size limit) ran out while the run wrote to its folder (the message says
    where and what was saved); `saved` is the last complete checkpoint (None: none yet), from which
    `--resume` continues once space is freed. Exit status 2 in `genrecal-train`, as in `genrecal-cache`."""

    def __init__(self, message: str, saved: Path | None):
        super().__init__(message)
        self.saved = saved


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (`signum`) stopped the run at `stage`/`step` (optimizer steps done in it; stage
    None: before training began); `saved` is the last complete checkpoint, from which `--resume` continues
    (None: none yet). Exit status 128 + signum in `genrecal-train` (130, 143)."""

    def __init__(self, signum: int, stage: int | None, step: int, saved: Path | None):
        where = "before training began" if stage is None else f"at stage {stage} step {step}"
        super().__init__(f"interrupted ({signal.Signals(signum).name}) {where}")
        self.signum, self.stage, self.step, self.saved = signum, stage, step, saved
