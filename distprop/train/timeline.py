"""``--timeline FILE``: a Chrome trace (JSON trace-event format) of a window of steps.

One process row per rank (``pid`` = rank). Thread 0 holds each step and, nested
in it, its phases: data_wait, forward, backward (with the wait for the bucket
reductions at its end nested inside) and optimizer. Each gradient bucket's
reduction gets a thread of its own (tid 1 + bucket index): reductions run on a
background thread while backward goes on, and Perfetto draws overlapping
complete events on one thread wrongly. Every rank records in memory; rank 0
gathers the events at the end and writes the file.

Clocks: each rank's timestamps count from the moment it left a barrier taken when
the recording was set up, so ranks on different nodes line up to within that
barrier's skew (tens of microseconds over MPI), whatever their clocks say.
"""

from __future__ import annotations

import json
import time

from distprop.checkpoint.durable import write_text_durably


class Timeline:
    def __init__(self, comm, first_step: int, last_step: int):
        """Record steps first_step..last_step (inclusive); call on every rank."""
        self.comm, self.first, self.last = comm, first_step, last_step
        self.events: list[dict] = []
        self._bucket_threads: set[int] = set()
        self.step = None
        comm.barrier()
        self.origin = time.perf_counter()

    def recording(self, step: int) -> bool:
        return self.first <= step <= self.last

    def _us(self, t: float) -> float:
        return round((t - self.origin) * 1e6, 3)

    def span(self, name: str, start: float, end: float, tid: int = 0, **args) -> None:
        event = {"name": name, "ph": "X", "pid": self.comm.rank, "tid": tid, "ts": self._us(start),
                 "dur": round((end - start) * 1e6, 3), "cat": "bucket" if tid else "step"}
        if args:
            event["args"] = args
        self.events.append(event)

    def reductions(self, wait_started: float, works) -> None:
        """The reducer's trace callback: backward's wait, and each bucket's reduction."""
        now = time.perf_counter()
        self.span("wait for reductions", wait_started, now)
        for work in works:
            bucket = work.bucket
            self._bucket_threads.add(bucket.index)
            self.span(f"allreduce bucket {bucket.index}", work.started,
                      work.finished if work.finished is not None else now, tid=1 + bucket.index,
                      bytes=int(bucket.size * bucket.dtype.itemsize), gradients=len(bucket.params))

    def write(self, path: str) -> None:
        """Gather every rank's events; rank 0 writes the trace (call on every rank)."""
        names = [{"name": "process_name", "ph": "M", "pid": self.comm.rank, "args": {"name": f"rank {self.comm.rank}"}},
                 {"name": "process_sort_index", "ph": "M", "pid": self.comm.rank,
                  "args": {"sort_index": self.comm.rank}},
                 {"name": "thread_name", "ph": "M", "pid": self.comm.rank, "tid": 0, "args": {"name": "training"}}]
        names += [{"name": "thread_name", "ph": "M", "pid": self.comm.rank, "tid": 1 + index,
                   "args": {"name": f"bucket {index} allreduce"}} for index in sorted(self._bucket_threads)]
        everyone = self.comm.allgather_object(names + self.events) if self.comm.size > 1 else [names + self.events]
        if self.comm.rank != 0:
            return
        trace = {
            "traceEvents": [event for events in everyone for event in events],
            "displayTimeUnit": "ms",
            "otherData": {"producer": "distprop train", "world_size": self.comm.size,
                          "steps": [self.first, self.last],
                          "clock": "microseconds since each rank left a common barrier"},
        }
        write_text_durably(path, json.dumps(trace))
