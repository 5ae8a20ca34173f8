"""What every gradient transport shares: the handle of a reduction in flight, and
the scheduling of blocking reductions (on a background thread while backward
continues, or on the training thread when it ends).

A transport takes the reducer's buckets one at a time, in the same order on every
rank, and averages each over the ranks. It needs of a bucket only: `index`,
`flat_gradient()` (the contiguous gradient to average), `wire` (a narrower buffer
for compression, or None), `compression` and `describe()`.

Interface: `start(bucket) -> Work`, `progress()` (called from the gradient hooks),
`finish()` (backward is over: complete what can be completed on the calling
thread), `close()`; optionally `bucket_buffers()`, storage the buckets must use.
"""

from __future__ import annotations

import collections
import threading
import time

from distprop import backend


class Work:
    """A bucket reduction in flight; `wait()` returns when its gradients hold the mean."""

    def __init__(self, bucket):
        self.bucket = bucket
        self._done = threading.Event()
        self.error = None
        # perf_counter() stamps for timelines (Reducer.trace): handed to the transport
        # (a background thread re-stamps when it takes the bucket up) and finished
        # (None where the transport does not know, e.g. a nonblocking MPI request).
        self.started, self.finished = time.perf_counter(), None

    def finish(self, error=None):
        self.error = error
        self.finished = time.perf_counter()
        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"allreduce of {self.bucket.describe()} failed: {self.error}") from self.error


def allreduce_mean(bucket, comm) -> None:
    """Average one bucket over `comm` with a blocking allreduce, through its wire
    dtype when compressed."""
    gradient = bucket.flat_gradient()
    wire = bucket.wire if bucket.wire is not None else gradient
    bucket.compression.compress(gradient, wire, comm.size)
    comm.allreduce_(wire, bucket.compression.reduce_op)
    bucket.compression.decompress(wire, gradient, comm.size)


class BlockingTransport:
    """Runs a blocking `reduce(bucket, idle)` (defined by subclasses) for each bucket,
    in submission order, in one of two ways chosen at construction:

    - background=True: on a background thread while the training thread continues
      backward (numpy and mpi4py release the GIL) -- worth it where that thread has a
      core of its own. Whatever it has not begun when backward ends runs on the
      training thread itself (see `finish`), which saves the hand-offs to the thread
      and back, each a wake-up of a sleeping thread.
    - background=False: nothing runs during backward; `finish` runs every bucket of
      the pass on the training thread, through `reduce_all`, which may merge them.
      Where the node's ranks already occupy every core a second thread has no core
      to overlap on: it takes time from training, and its hand-offs cost wake-ups.

    `idle` tells `reduce` that the calling thread has nothing else to do (backward
    is over), so a short busy wait costs it nothing, where on the background thread
    it would take a core from training."""

    name = "blocking"

    def __init__(self, background: bool = True):
        self._pending: collections.deque = collections.deque()
        self._turn = threading.Condition()  # one reduction at a time, in submission order
        self._busy = self._closing = False
        self._thread = None
        if background:
            self._gpu = backend.current_gpu_id() if backend.gpu_available() else None
            self._thread = threading.Thread(target=self._run, name=f"distprop-{self.name}-allreduce",
                                            daemon=True)
            self._thread.start()

    @property
    def background(self) -> bool:
        return self._thread is not None

    def reduce(self, bucket, idle: bool) -> None:
        raise NotImplementedError

    def reduce_all(self, buckets: list, idle: bool) -> None:
        """Reduce `buckets` (consecutive, in order) on the calling thread. Without a
        background thread these are all of a pass's buckets, the same on every rank,
        so a subclass may merge them; with one, which buckets are left for the
        training thread depends on timing, so they go one by one."""
        for bucket in buckets:
            self.reduce(bucket, idle)

    def start(self, bucket) -> Work:
        work = Work(bucket)
        with self._turn:
            self._pending.append(work)
            if self._thread is not None:
                self._turn.notify_all()
        return work

    def progress(self) -> None:
        pass  # the thread progresses on its own

    def finish(self) -> None:
        """Backward is over: run the reductions not yet begun on the calling thread."""
        if self._thread is None:
            works = list(self._pending)
            self._pending.clear()
            if works:
                self._execute(works, idle=True, merged=True)
            return
        while True:
            with self._turn:
                while self._busy:
                    self._turn.wait()
                if not self._pending:
                    return
                work = self._take()
            self._execute([work], idle=True)

    def _take(self) -> Work:
        self._busy = True
        return self._pending.popleft()

    def _execute(self, works: list, idle: bool, merged: bool = False) -> None:
        started = time.perf_counter()  # for timelines: when the reduction itself began
        for work in works:
            work.started = started
        try:
            if merged:
                self.reduce_all([work.bucket for work in works], idle)
            else:
                self.reduce(works[0].bucket, idle)
        except BaseException as error:  # handed to the waiting thread
            for work in works:
                work.finish(error)
            if idle and not isinstance(error, Exception):
                raise  # e.g. KeyboardInterrupt on the training thread: that thread's own
        else:
            for work in works:
                work.finish()
        finally:
            with self._turn:
                self._busy = False
                self._turn.notify_all()

    def _run(self) -> None:
        if self._gpu is not None:
            backend.use_gpu(self._gpu)  # the current GPU is per thread
        while True:
            with self._turn:
                while (self._busy or not self._pending) and not self._closing:
                    self._turn.wait()
                if self._closing:
                    return
                work = self._take()
            self._execute([work], idle=False)

    def close(self) -> None:
        if self._thread is not None:
            with self._turn:
                self._closing = True
                self._turn.notify_all()
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # a reduction is stuck in the communicators: leave them be
                return
        self._free_communicators()

    def _free_communicators(self) -> None:
        pass
