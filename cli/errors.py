"""How the command-line tools end on a user's error: one line `error: ...` on stderr, exit status 2
(a usage error: a bad cache, value, file or folder), no traceback. `GENRECAL_DEBUG=1` (or a tool's
`--debug`) lets the exception through instead, traceback and all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NoReturn

import typer

__all__ = ["clean_errors", "debugging", "fail"]


def debugging() -> bool:
    """Whether tracebacks are wanted: GENRECAL_DEBUG set to anything but "" or "0"."""
    return os.environ.get("GENRECAL_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with one line (`error: message`) and exit status `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def clean_errors(where: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Known failures (a bad cache, an unreachable server, a missing fsspec backend, an extraction that is refused
    or made nothing usable, a folder another process writes, and the `also` types a tool adds) end with one clear
    line and status 2. `where` names what the command works on (kept for the callers; messages name it)."""
    from genrecal_cache.extract import ExtractError
    from genrecal_cache.format.manifest import CacheFormatError
    from genrecal_cache.io.retry import RemoteReadError
    from genrecal_cache.journal import CacheWriteError, DirLockedError

    known = (CacheFormatError, RemoteReadError, ImportError, ExtractError, DirLockedError, CacheWriteError, *also)
    try:
        yield
    except known as e:
        if debugging():
            raise
        fail(str(e))
