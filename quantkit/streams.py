"""Overlapping the stages of a stream: a producer thread that runs ahead of its consumer.

Reading and merging (or dequantizing) the next chunk runs while the current one is quantized or
written: torch ops and file I/O release the GIL, so the two threads use two cores. At most
`depth` items wait in the queue, which bounds the memory in flight. An exception in the producer
is re-raised in the consumer; a consumer that stops early stops the producer.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, _DONE))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((False, e))

    worker = threading.Thread(target=produce, name="quantkit-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():      # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)
