"""Work done ahead on a background thread while the consumer works: `prefetch` runs a whole iterator
ahead (extraction input, training batches); `read_ahead` runs the next reads of a known list (a
cache's read groups)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, TypeVar

__all__ = ["prefetch", "read_ahead"]

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(read: Callable[[T], R], items: list[T], n: int) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in order, the next `n` reads running on one background thread while the
    caller consumes the current result (n < 1: each read on demand). Stopping early drops the reads
    not started and waits for the running one."""
    if n < 1 or len(items) < 2:
        for item in items:
            yield item, read(item)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="genrecal-readahead")
    try:
        pending = deque(pool.submit(read, item) for item in items[:n])
        for j, item in enumerate(items):
            result = pending.popleft().result()
            if j + n < len(items):
                pending.append(pool.submit(read, items[j + n]))
            yield item, result
            del result  # the caller's buffers become reusable as soon as it lets go of them
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prefetch(items: Iterator[T], size: int) -> Iterator[T]:
    """Run `items` in a background thread, `size` ahead: reading, image decoding and tokenizing
    overlap the teacher forward. Exceptions reach the consumer.

    Stopping early (closing this generator) stops the producer, closes `items` in the producer's
    thread (so its own `finally` blocks run: thread pools shut down, files close) and joins the
    thread before returning. No producer is left running native code (torch, tokenizers) when the
    interpreter exits, which aborted finished runs with "terminate called without an active exception"."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def put(item: object) -> bool:
        """Queue `item` unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, daemon=True, name="genrecal-encode")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()
