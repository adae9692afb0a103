"""Build the next steps' micro-batches on a background thread so the GPU never waits for
collation or host-to-device copies."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(produce: Callable[[int], T], keys: range, depth: int = 2) -> Iterator[T]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for k in keys:
                if stop.is_set():
                    return
                q.put(produce(k))
        except BaseException as e:  # surfaced in the consumer, with its traceback
            q.put(e)
        q.put(_DONE)

    thread = threading.Thread(target=work, daemon=True, name="verlite-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
