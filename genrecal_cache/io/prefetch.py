"""A bounded background iterator: the producer's work overlaps the consumer's."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")


def prefetch(items: Iterator[T], size: int) -> Iterator[T]:
    """Run `items` in a background thread, `size` ahead: reading, image decoding and tokenizing
    overlap the teacher forward. Exceptions reach the consumer; stopping early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=produce, daemon=True, name="genrecal-encode")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
