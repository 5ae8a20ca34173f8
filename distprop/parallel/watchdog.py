"""A watchdog that turns a stuck collective into a clear abort instead of a hang.

Every collective a communicator issues is tracked (what, training step, start
time). A background thread checks them; one that has not completed within the
timeout makes this rank ask every other rank where it is -- over a communicator of
the watchdog's own, answered by the other ranks' watchdog threads even while their
main threads are blocked -- print what it learnt, and abort the whole job.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time

_QUERY, _REPLY = 71, 72


class Watchdog:
    def __init__(self, mpi_comm, timeout: float, abort, poll_interval: float | None = None,
                 reply_wait: float = 3.0):
        """mpi_comm: a communicator used by watchdog threads only (a Dup of the job's;
        close() frees it). abort: called with an exit code to end the job."""
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.timeout = float(timeout)
        self.abort = abort
        self.reply_wait = reply_wait
        self.poll_interval = poll_interval or min(1.0, max(self.timeout / 20, 0.05))
        self.step = 0  # set by the training loop / DataParallel, quoted in reports
        self._lock = threading.Lock()
        self._active: dict[int, tuple] = {}  # token -> (what, step, sequence number, start)
        self._tokens = itertools.count()
        self._sequence = 0
        self._last = None  # (what, step, sequence) of the last collective that completed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distprop-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def track(self, what: str):
        """Mark a collective as in flight for the duration of the `with` block."""
        with self._lock:
            token = next(self._tokens)
            self._sequence += 1
            entry = (what, self.step, self._sequence, time.monotonic())
            self._active[token] = entry
        try:
            yield
        finally:
            with self._lock:
                del self._active[token]
                self._last = entry[:3]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive() and self.comm is not None:  # its receive is cancelled by now
            self.comm.Free()
            self.comm = None

    # ---- background thread --------------------------------------------------
    def _run(self) -> None:
        self._query = self.comm.irecv(source=_any_source(), tag=_QUERY)
        try:
            while not self._stop.wait(self.poll_interval):
                self._answer_queries()
                stuck = self._oldest_overdue()
                if stuck is not None:
                    self._report_and_abort(stuck)
                    return
        finally:
            # A receive left pending would be erroneous at MPI_Finalize.
            self._query.Cancel()
            self._query.Wait()

    def _answer_queries(self) -> None:
        done, asker = self._query.test()
        while done:
            self.comm.isend(self._status(), dest=asker, tag=_REPLY)
            self._query = self.comm.irecv(source=_any_source(), tag=_QUERY)
            done, asker = self._query.test()

    def _oldest_overdue(self):
        now = time.monotonic()
        with self._lock:
            overdue = [e for e in self._active.values() if now - e[3] > self.timeout]
        return min(overdue, key=lambda e: e[3]) if overdue else None

    def _status(self) -> dict:
        now = time.monotonic()
        with self._lock:
            active = sorted(self._active.values(), key=lambda e: e[3])
            current = active[0] if active else None
            return {
                "rank": self.rank,
                "current": None if current is None else (current[0], current[1], current[2], now - current[3]),
                "last": self._last,
            }

    def _ask_other_ranks(self) -> dict[int, dict]:
        for other in range(self.size):
            if other != self.rank:
                self.comm.isend(self.rank, dest=other, tag=_QUERY)
        replies: dict[int, dict] = {}
        requests = {other: self.comm.irecv(source=other, tag=_REPLY)
                    for other in range(self.size) if other != self.rank}
        deadline = time.monotonic() + self.reply_wait
        while requests and time.monotonic() < deadline:
            self._answer_queries()  # ranks that timed out too are asking us
            for other, request in list(requests.items()):
                done, status = request.test()
                if done:
                    replies[other] = status
                    del requests[other]
            time.sleep(0.01)
        return replies

    def _report_and_abort(self, stuck) -> None:
        what, step, sequence, start = stuck
        waited = time.monotonic() - start
        replies = self._ask_other_ranks() if self.size > 1 else {}
        lines = [f"distprop watchdog: rank {self.rank}: collective '{what}' (step {step}, "
                 f"collective #{sequence} on this rank) has not completed after {waited:.0f} s "
                 f"(timeout {self.timeout:g} s); aborting the job."]
        for other in range(self.size):
            if other == self.rank:
                continue
            status = replies.get(other)
            lines.append(f"  rank {other}: {_describe(status)}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        self.abort(3)


def _describe(status) -> str:
    if status is None:
        return "no answer (process dead, or stuck outside distprop's control)"
    current, last = status["current"], status["last"]
    if current is not None:
        what, step, sequence, seconds = current
        return f"waiting in '{what}' (step {step}, collective #{sequence}) for {seconds:.0f} s"
    if last is not None:
        what, step, sequence = last
        return f"not in a collective; last completed '{what}' (step {step}, collective #{sequence})"
    return "not in a collective; none completed yet"


def _any_source():
    from mpi4py import MPI

    return MPI.ANY_SOURCE
