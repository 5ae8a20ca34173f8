"""Running a batch generator ahead of its consumer, in a daemon thread.

The queue holds at most `depth` batches, so the thread stays that far ahead and no
further. Exceptions raised in the thread reach the consumer unchanged (same type,
same message). `close` stops the thread promptly whether it is producing or waiting
on a full queue, and the thread is a daemon, so an iterator nobody closes cannot
keep the process from exiting.
"""

from __future__ import annotations

import queue
import threading


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _pump(produce, out: queue.Queue, stop: threading.Event) -> None:
    """Background thread body: run the producer, hand results over through `out`."""
    def put(item) -> bool:
        # A blocking put, not a polling one: a thread waking up every few milliseconds
        # steals a core from BLAS threads that wait for each other. `close` sets `stop`
        # and then empties the queue, which releases a put blocked on a full queue.
        if stop.is_set():
            return False
        out.put(item)
        return not stop.is_set()

    generator = produce()
    try:
        for item in generator:
            if not put(item):
                return
        put(_END)
    except BaseException as error:  # handed to the consumer, raised there with its own message
        put(_Failure(error))
    finally:
        generator.close()


class Prefetcher:
    """Runs a producer in a daemon thread, at most `depth` batches ahead of the consumer."""

    def __init__(self, produce, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_pump, args=(produce, self._queue, self._stop),
                                        name="distprop-loader", daemon=True)
        self._thread.start()

    def __next__(self):
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


class Inline:
    """prefetch=0: run the producer in the consumer's thread (no overlap; for debugging)."""

    def __init__(self, produce):
        self._generator = produce()

    def __next__(self):
        return next(self._generator)

    def close(self) -> None:
        self._generator.close()
