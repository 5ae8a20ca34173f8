"""Worker processes that build batches in shared memory (``ArrowLoader(num_workers=N)``).

The loader's background thread hands out batches round-robin, batch ``k`` of a
stretch to worker ``k mod N``, and takes them back in the same order, so the
batches are the same whatever N is (and the same as with no workers: each sample's
augmentation depends on its own index only). Each batch is built straight into a
free slot of shared memory (see `distprop.data.shared_slots`), only a few small
numbers travel through the socket pair of each worker (no array is pickled), and
the training loop receives views of the slot, not a copy; the slot is filled again
once the last of those views is gone. All but one slot may be lent at a time (one
stays for the workers); a batch that would take the last is copied out instead.

Failures end the epoch with a DataError in the training process:

* a worker that raises (a corrupt image, a bad token id) sends its message, which
  names the file, row group and row;
* a worker that dies (killed, out of memory, a crash in a decoder) closes its end of
  the socket, which the loader sees at once; the error says how it died and which
  row groups and rows the batch it was building comes from.

The workers are started on the first ``iter(loader)`` and kept across epochs, as
fresh interpreters (``python -m distprop.data.worker_process``): no fork of a
process that may hold MPI, CUDA or thread state, and the training script is not
imported again. They stop with `close` (also called when the loader is garbage
collected and at interpreter exit) and exit on their own if the training process
disappears.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait

import numpy as np

from distprop.data.batch import BatchRows, BatchSpec
from distprop.data.shared_slots import FreeSlots, SharedSlots, slot_layout
from distprop.errors import DataError

_STOP_WAIT_S = 1.0  # a worker still busy after this is killed: nothing it holds needs saving


class WorkerPool:
    """`num_workers` worker processes and the shared slots they fill."""

    def __init__(self, spec: BatchSpec, num_workers: int, slots: int, batch_size: int, cache_blocks: int):
        self.spec, self.num_workers = spec, num_workers
        self.offsets, slot_bytes = slot_layout(spec.outputs, batch_size)
        self.slots = SharedSlots(slots, slot_bytes)
        self.free = FreeSlots(slots)
        self.generation = 0
        self.broken = False  # a worker died: the loader starts a new pool for the next epoch
        self.outstanding: dict[int, set] = {}   # worker -> {(generation, slot)} handed out, not yet answered
        self.processes: list[subprocess.Popen] = []
        self.connections: list[Connection] = []
        setup = {"spec": spec, "cache_blocks": cache_blocks, "offsets": self.offsets,
                 "slots": slots, "slot_bytes": slot_bytes}
        try:
            for _ in range(num_workers):
                self._start(setup)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.connections, self.slots, self.free)
        atexit.register(self._finalizer)

    def _start(self, setup: dict) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            command = [sys.executable, "-m", "distprop.data.worker_process",
                       str(theirs.fileno()), str(self.slots.fd), str(os.getpid())]
            environment = dict(os.environ, OMP_NUM_THREADS="1")  # one core each; the pool is the parallelism
            process = subprocess.Popen(command, pass_fds=(theirs.fileno(), self.slots.fd), env=environment)
        connection = Connection(ours.detach())
        self.processes.append(process)
        self.connections.append(connection)
        try:
            connection.send(setup)
        except OSError:
            raise DataError(self._death(len(self.processes) - 1, None, None, "its start")) from None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def close(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            _stop(self.processes, self.connections, self.slots, self.free)

    # -- one stretch of an epoch --------------------------------------------------------

    def batches(self, epoch: int, work, describe_epoch: str):
        """Yield ``(batch number, arrays, samples skipped)`` for `work`, an iterable of
        ``(batch number, BatchRows)``, in its order. The arrays are views of shared
        memory, lent until the last view of them is dropped."""
        self._drain()
        self.generation += 1
        generation = self.generation
        for worker in range(self.num_workers):
            self._send(worker, ("epoch", epoch), None, None, describe_epoch)
        work = iter(work)
        pending: deque[tuple[int, int, int, BatchRows]] = deque()   # (batch, worker, slot, rows) in order
        turn = 0

        def hand_out() -> None:
            """Give every free slot a batch to build."""
            nonlocal turn, work
            while work is not None:
                slot = self.free.take()
                if slot is None:
                    return
                item = next(work, None)
                if item is None:
                    self.free.put(slot)
                    work = None
                    return
                batch, rows = item
                worker = turn % self.num_workers
                turn += 1
                self._send(worker, ("batch", generation, batch, slot, rows.blocks.tolist(), rows.bounds.tolist(),
                                    rows.local.tolist()), batch, rows, describe_epoch)
                self.outstanding.setdefault(worker, set()).add((generation, slot))
                pending.append((batch, worker, slot, rows))

        hand_out()
        while pending:
            batch, worker, slot, rows = pending[0]
            connection = self.connections[worker]
            # Slots the consumer gives back while this batch is built go to idle workers.
            while self.free.wakeup in wait([connection, self.free.wakeup]):
                self.free.clear_wakeups()
                hand_out()
                if connection.poll():
                    break
            pending.popleft()
            _, _, _, _, size, skipped = self._receive(worker, batch, rows, describe_epoch)
            yield batch, self._deliver(slot, size), skipped
            hand_out()

    def _deliver(self, slot: int, size: int) -> dict:
        """The batch in `slot` as views lent to the consumer, or copied out (and the slot
        freed at once) when lending it would leave the workers no slot."""
        if self.free.lent < self.slots.count - 1:
            return self.slots.lend(slot, self.offsets, self.spec.outputs, size, self.free)
        batch = {name: np.array(array) for name, array in
                 self.slots.arrays(slot, self.offsets, self.spec.outputs, size).items()}
        self.free.put(slot)
        return batch

    def _send(self, worker: int, message: tuple, batch, rows, describe_epoch: str) -> None:
        """Send to `worker`; a worker already dead (its end of the socket closed) ends the
        epoch as a death seen while receiving does."""
        try:
            self.connections[worker].send(message)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise DataError(self._death(worker, batch, rows, describe_epoch)) from None

    def _receive(self, worker: int, batch: int, rows: BatchRows, describe_epoch: str) -> tuple:
        connection = self.connections[worker]
        while True:
            try:
                reply = connection.recv()
            except (EOFError, OSError):
                raise DataError(self._death(worker, batch, rows, describe_epoch)) from None
            kind, generation, _, slot = reply[:4]
            self.outstanding[worker].discard((generation, slot))
            if generation != self.generation:  # an answer to a stretch that was abandoned
                self.free.put(slot)
                continue
            if kind == "error":
                _, _, _, _, type_name, message, user_error = reply
                if user_error:
                    raise DataError(message)
                raise DataError(f"data worker {worker} failed on batch {batch} of {describe_epoch} "
                                f"({rows.describe(self.spec.index)}): {type_name}: {message}")
            return reply

    def _death(self, worker: int, batch: int, rows: BatchRows, describe_epoch: str) -> str:
        self.broken = True
        process = self.processes[worker]
        try:
            code = process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "closed its connection"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        where = self.spec.index.location.display
        if rows is None:
            return f"{where}: data worker {worker} (pid {process.pid}) {how} at {describe_epoch}"
        return (f"{where}: data worker {worker} (pid {process.pid}) {how} while building batch {batch} of "
                f"{describe_epoch}, from {rows.describe(self.spec.index)}")

    def _drain(self) -> None:
        """Wait for the answers still owed from an abandoned stretch, so their slots are free."""
        for worker, owed in self.outstanding.items():
            while owed:
                try:
                    reply = self.connections[worker].recv()
                except (EOFError, OSError):
                    self.broken = True
                    raise DataError(f"{self.spec.index.location.display}: data worker {worker} (pid "
                                    f"{self.processes[worker].pid}) died between epochs") from None
                owed.discard((reply[1], reply[3]))
                self.free.put(reply[3])


def _stop(processes: list, connections: list, slots: SharedSlots, free: FreeSlots) -> None:
    for connection in connections:
        try:
            connection.send(("stop",))
        except OSError:
            pass
    deadline = time.monotonic() + _STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # busy with a batch that is not needed any more
            process.kill()
            process.wait()
    for connection in connections:
        connection.close()
    slots.close()
    free.close()

