"""What every gradient transport shares: the handle of a reduction in flight, and
the background thread that runs blocking reductions while backward continues.

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


class BackgroundTransport:
    """Runs bucket reductions, in submission order, on a background thread; the
    training thread keeps computing meanwhile (numpy and mpi4py release the GIL).
    Subclasses define `reduce(bucket, idle)`, which runs on that thread -- or on the
    training thread itself once backward is over (see `finish`): `idle` then says
    that the calling thread has nothing else to do, so a short busy wait costs
    nothing, where on the background thread it would take a core from training."""

    name = "background"

    def __init__(self):
        self._pending: collections.deque = collections.deque()
        self._turn = threading.Condition()  # one reduction at a time, in submission order
        self._busy = self._closing = False
        self._gpu = backend.current_gpu_id() if backend.gpu_available() else None
        self._thread = threading.Thread(target=self._run, name=f"distprop-{self.name}-allreduce", daemon=True)
        self._thread.start()

    def reduce(self, bucket, idle: bool) -> None:
        raise NotImplementedError

    def start(self, bucket) -> Work:
        work = Work(bucket)
        with self._turn:
            self._pending.append(work)
            self._turn.notify_all()
        return work

    def progress(self) -> None:
        pass  # the thread progresses on its own

    def finish(self) -> None:
        """Run the reductions the thread has not begun on the calling thread: called
        when backward is over and the caller would only wait for them. It saves the
        hand-offs to the thread and back, each a wake-up of a sleeping thread."""
        while True:
            with self._turn:
                while self._busy:
                    self._turn.wait()
                if not self._pending:
                    return
                work = self._take()
            self._execute(work, idle=True)

    def _take(self) -> Work:
        self._busy = True
        return self._pending.popleft()

    def _execute(self, work: Work, idle: bool) -> None:
        work.started = time.perf_counter()  # for timelines: when the reduction itself began
        try:
            self.reduce(work.bucket, idle)
        except BaseException as error:  # handed to the waiting thread
            work.finish(error)
            if idle and not isinstance(error, Exception):
                raise  # e.g. KeyboardInterrupt on the training thread: that thread's own
        else:
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
            self._execute(work, idle=False)

    def close(self) -> None:
        with self._turn:
            self._closing = True
            self._turn.notify_all()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # else a reduction is stuck in them: leave them be
            self._free_communicators()

    def _free_communicators(self) -> None:
        pass
