"""Overlapping the stages of a stream, each with a bounded number of items in flight.

    prefetch   a producer thread that runs ahead of its consumer (reading, merging)
    to_device  host → GPU copies on a side stream, one item ahead of the work on the current one
    to_host    GPU → pinned host copies that do not wait (an event says when they are done)
    Worker     a consumer thread behind a bounded queue (writing)

Torch ops and file I/O release the GIL, so the threads use separate cores. At most `depth` items
wait in each queue, which bounds the memory in flight. An exception in a thread is re-raised in
the main one; a consumer that stops early stops the producer.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
M = TypeVar("M")
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


class Worker:
    """A consumer thread behind a bounded queue: `put` hands it an item and returns at once unless
    `depth` items already wait. The thread calls `fn(item)` in order. Its first exception stops it
    and is re-raised in the caller at the next `put` or at `close`.

        with Worker(write) as w:      # close() on success; on an exception, stop without raising
            for item in items:
                w.put(item)
    """

    def __init__(self, fn, depth: int = 4, name: str = "quantkit-worker"):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE or self._stop.is_set():
                return
            try:
                self._fn(item)
            except BaseException as e:  # handed to the caller, raised there
                self._error = e
                self._stop.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, item) -> None:
        while True:
            self._raise()
            if self._stop.is_set():
                raise RuntimeError("worker stopped")
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every item is done; raise the worker's exception if it had one."""
        while self._thread.is_alive():
            try:
                self._q.put(_DONE, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without finishing the queue; an exception of the worker is dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                pass
            try:
                self._q.put_nowait(_DONE)
            except queue.Full:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def to_device(items: Iterable[tuple[M, torch.Tensor]], device: torch.device) -> Iterator[tuple[M, torch.Tensor]]:
    """(meta, tensor) → (meta, the tensor on `device`); None passes as None. On CUDA each copy is issued on a side
    stream as soon as its item arrives, and the item is handed on one step later, once the stream
    the caller computes on (the current one) is told to wait for that copy: the copy of the next
    chunk overlaps the work on this one. Host tensors should be pinned for the copy not to block."""
    if device.type != "cuda":
        for meta, x in items:
            yield meta, (x.to(device) if x is not None else None)
        return
    copy = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    pending = None
    for meta, x in items:
        with torch.cuda.stream(copy):
            xd = x.to(device, non_blocking=True) if x is not None else None
            done = torch.cuda.Event()
            done.record(copy)
        if pending is not None:
            yield _arrived(compute, *pending)
        pending = (meta, xd, done)
    if pending is not None:
        yield _arrived(compute, *pending)


def _arrived(compute, meta, xd, done):
    compute.wait_event(done)
    if xd is not None:
        xd.record_stream(compute)   # its memory is reused only after the work queued on it
    return meta, xd


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy of a GPU tensor, into pinned memory, without waiting: valid once an event
    recorded after it has completed. A CPU tensor is returned as it is."""
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)
