"""Retrying remote requests: the policy, the loops, and the errors they end in.

A request is retried on transient errors -- connection refused/reset/dropped, truncated bodies,
timeouts, HTTP 408/425/429/5xx -- with exponential backoff and jitter; when the attempts run out it
raises `RemoteReadError` naming the URL. The policy comes from storage_options (`genrecal_retries`,
`genrecal_retry_backoff`, `genrecal_retry_max_backoff`, `genrecal_read_timeout`; popped before
fsspec sees them) or the environment (`GENRECAL_RETRIES`, `GENRECAL_RETRY_BACKOFF`,
`GENRECAL_READ_TIMEOUT`); default 5 retries from 0.5 s, doubling, at most 20 s apart.

A loop given `cancelled` stops at its next attempt or wait once that returns True (the reader
closed, or a sibling read failed), raising `ReadCancelled`: nothing is sent after that.
`gather_cancelling` runs the requests of one read (the reader's five arrays) so that the first
error cancels all the others, including the ones zarr started inside them, before it is raised.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_BACKOFF", "ENV_READ_TIMEOUT", "ENV_RETRIES", "ReadCancelled", "RemoteReadError", "RetryPolicy",
           "gather_cancelling", "is_transient", "join_read", "retry_async", "retry_call"]

log = logging.getLogger("genrecal.remote")

ENV_RETRIES, ENV_BACKOFF, ENV_READ_TIMEOUT = "GENRECAL_RETRIES", "GENRECAL_RETRY_BACKOFF", "GENRECAL_READ_TIMEOUT"
_OPTIONS = {"genrecal_retries": "retries", "genrecal_retry_backoff": "backoff",
            "genrecal_retry_max_backoff": "max_backoff", "genrecal_read_timeout": "read_timeout"}
_POLL = 0.05  # seconds between two looks at `cancelled` while waiting to retry


class RemoteReadError(RuntimeError):
    """A remote read kept failing after every retry: the server or the network is at fault, not the cache."""


class ReadCancelled(RemoteReadError):
    """A request given up on purpose before it was sent (again): its reader closed, or a sibling read failed."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5             # attempts after the first one
    backoff: float = 0.5         # seconds before the first retry; doubles after each
    max_backoff: float = 20.0    # ceiling of one wait
    read_timeout: float = 30.0   # HTTP(S): seconds to connect, and between two reads of an answer (0: none)

    def delays(self) -> list[float]:
        return [min(self.max_backoff, self.backoff * 2 ** k) * random.uniform(0.8, 1.2) for k in range(self.retries)]

    @classmethod
    def from_options(cls, storage_options: dict[str, Any] | None) -> tuple[RetryPolicy, dict[str, Any]]:
        """The policy (storage_options keys, else environment, else defaults) and the options left for fsspec."""
        options = dict(storage_options or {})
        values: dict[str, Any] = {}
        if os.environ.get(ENV_RETRIES):
            values["retries"] = os.environ[ENV_RETRIES]
        if os.environ.get(ENV_BACKOFF):
            values["backoff"] = os.environ[ENV_BACKOFF]
        if os.environ.get(ENV_READ_TIMEOUT):
            values["read_timeout"] = os.environ[ENV_READ_TIMEOUT]
        for key, name in _OPTIONS.items():
            if key in options:
                values[name] = options.pop(key)
        try:
            policy = cls(retries=int(values.get("retries", cls.retries)),
                         backoff=float(values.get("backoff", cls.backoff)),
                         max_backoff=float(values.get("max_backoff", cls.max_backoff)),
                         read_timeout=float(values.get("read_timeout", cls.read_timeout)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid retry setting {values} ({ENV_RETRIES}/{ENV_BACKOFF}/{ENV_READ_TIMEOUT} or "
                             f"storage_options {sorted(_OPTIONS)}): {e}") from None
        if min(policy.retries, policy.backoff, policy.max_backoff, policy.read_timeout) < 0:
            raise ValueError(f"retry settings must be >= 0, got {policy}")
        return policy, options


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection trouble, timeouts, truncated bodies, 408/425/429/5xx.

    fsspec's HTTP size probe turns every failure into FileNotFoundError; its cause tells them apart."""
    import aiohttp

    e: BaseException | None = exc
    for _ in range(4):
        if e is None or isinstance(e, RemoteReadError):
            return False
        status = getattr(e, "status", None)
        if not isinstance(status, int):
            status = getattr(e, "code", None)  # gcsfs HttpError, urllib HTTPError
        if not isinstance(status, int):  # botocore ClientError (s3fs): the answer's status
            response = getattr(e, "response", None)
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        if isinstance(status, int) and not isinstance(status, bool) and (status in (408, 425, 429)
                                                                          or 500 <= status < 600):
            return True
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError,
                          TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(e, aiohttp.ClientResponseError):
            return False
        if _botocore_transport_error(e):  # s3fs: a connection refused, dropped or timed out
            return True
        e = e.__cause__
    return False


def _botocore_transport_error(e: BaseException) -> bool:
    boto = sys.modules.get("botocore.exceptions")  # loaded by s3fs when it is in use
    return boto is not None and isinstance(e, (boto.HTTPClientError, boto.ConnectionError))


def _describe(e: BaseException) -> str:
    text = str(e) or repr(e)
    cause = e.__cause__
    if isinstance(e, FileNotFoundError) and cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {text}"[:300]


def _give_up(where: str, attempts: int, started: float, last: BaseException) -> RemoteReadError:
    return RemoteReadError(f"{where}: still failing after {attempts} attempts over {time.monotonic() - started:.1f}s "
                           f"(last error {_describe(last)}); the server or network is unavailable. Try again later, "
                           f"or raise {ENV_RETRIES} / storage_options genrecal_retries")


def _retry_delay(e: Exception, where: str, attempt: int, delays: list[float], started: float) -> float:
    """Seconds to wait before retrying after failure number `attempt` (0-based); raises `e` when it is not
    transient, and RemoteReadError when the retries are spent."""
    if not is_transient(e):
        raise e
    if attempt == len(delays):
        raise _give_up(where, attempt + 1, started, e) from e
    log.warning("%s: %s; retry %d/%d in %.1fs", where, _describe(e), attempt + 1, len(delays), delays[attempt])
    return delays[attempt]


def retry_call(policy: RetryPolicy, where: str, fn: Callable[[], Any],
               cancelled: Callable[[], bool] | None = None) -> Any:
    """`fn()` with retries on transient errors (synchronous callers); see the module doc for `cancelled`."""
    started, delays = time.monotonic(), policy.delays()
    for attempt in range(len(delays) + 1):
        _check(cancelled, where)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by _retry_delay
            wait_until = time.monotonic() + _retry_delay(e, where, attempt, delays, started)
            while (left := wait_until - time.monotonic()) > 0:
                _check(cancelled, where)
                time.sleep(min(left, _POLL) if cancelled is not None else left)


async def retry_async(policy: RetryPolicy, where: str, fn: Callable[[], Any],
                      cancelled: Callable[[], bool] | None = None) -> Any:
    """`await fn()` with retries on transient errors (cancelled like any task, or by `cancelled`)."""
    started, delays = time.monotonic(), policy.delays()
    for attempt in range(len(delays) + 1):
        _check(cancelled, where)
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - classified by _retry_delay
            wait_until = time.monotonic() + _retry_delay(e, where, attempt, delays, started)
            while (left := wait_until - time.monotonic()) > 0:
                _check(cancelled, where)
                await asyncio.sleep(min(left, _POLL) if cancelled is not None else left)


def _check(cancelled: Callable[[], bool] | None, where: str) -> None:
    if cancelled is not None and cancelled():
        raise ReadCancelled(f"{where}: cancelled (the cache was closed, or another read of the same batch failed)")


# ---- one read's requests, cancelled together -------------------------------------------------------

@dataclass
class _Read:
    failed: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)


_READ: contextvars.ContextVar[_Read | None] = contextvars.ContextVar("genrecal_read", default=None)


def join_read(where: str) -> None:
    """Called by a store as a request starts: the running task joins the read it serves (the tasks
    zarr creates inherit it), to be cancelled with it; once that read has failed, nothing starts."""
    read = _READ.get()
    if read is None:
        return
    if read.failed:
        raise ReadCancelled(f"{where}: cancelled (another request of the same read failed)")
    task = asyncio.current_task()
    if task is not None:
        read.tasks.add(task)


async def gather_cancelling(*aws: Any) -> list[Any]:
    """`asyncio.gather(*aws)`, except that on the first error every other request of this read is
    cancelled and awaited before the error is raised. (asyncio.gather, and zarr's own fan-out built on
    it, leave the others running: retrying, and sending requests after the reader was closed.)"""
    read = _Read()
    token = _READ.set(read)
    try:
        tasks = [asyncio.ensure_future(a) for a in aws]  # each copies the context: it belongs to `read`
    finally:
        _READ.reset(token)
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        read.failed = True
        others = [t for t in {*tasks, *read.tasks} if not t.done()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        raise
