"""One rank's epoch as a stream of assembled batches: which blocks each batch needs,
and, with ``num_workers=0``, reading them on a pool of threads with bounded
read-ahead and building each batch in this process (see `distprop.data.batch`).

Runs inside the loader's background thread (see `distprop.data.prefetch`); with
worker processes `distprop.data.workers` takes the building part.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distprop.data.batch import BatchBuilder, BatchRows, BatchSpec, prepare_block
from distprop.data.reader import BlockReader
from distprop.data.sampler import EpochOrder, RankPlan


class Schedule:
    """Which blocks each remaining batch needs, and when each block is read and freed.

    A batch uses the blocks its samples come from and, packed, the blocks its windows
    run on into. A block is read once for each *run* of batches that use it: uses closer than
    `horizon` batches (the batches one shuffle window spans) share one read, so a
    block stays decoded while its window is being consumed; a later use (wrap-around
    padding, a re-sharded stretch) reads it again rather than pinning it in memory.
    """

    def __init__(self, spec: BatchSpec, order: EpochOrder, plan: RankPlan, start: int, window: int):
        self.start = start
        self.batches: list[tuple[np.ndarray, BatchRows]] = []  # (schedule entries used, rows) per batch
        self.entry_block: list[int] = []   # block read by each entry
        self.entry_first: list[int] = []   # first batch needing it
        self.release_after: dict[int, list[int]] = {}  # batch -> entries no longer needed after it
        block_first = spec.sample_block_starts  # first sample id of each block
        horizon = -(-window * int(spec.samples_per_block.max()) // plan.batch_size) + 1
        current: dict[int, int] = {}       # block -> its open entry
        entry_last: list[int] = []
        for batch in range(start, plan.num_batches):
            rows = np.concatenate([order.rows(lo, hi) for lo, hi in plan.batch_positions(batch)])
            block = np.searchsorted(block_first, rows, side="right") - 1
            grouping = np.argsort(block, kind="stable")
            rows, block = rows[grouping], block[grouping]
            local = rows - block_first[block]
            starts = np.concatenate([[0], np.flatnonzero(block[1:] != block[:-1]) + 1])
            blocks = needed = block[starts]
            if spec.packed is not None:  # and the blocks its windows run on into
                beyond = spec.packed.blocks_run_into(rows, block)
                if len(beyond):
                    needed = np.union1d(blocks, beyond)
            entries = []
            for b in needed.tolist():
                entry = current.get(b)
                if entry is None or batch - entry_last[entry] > horizon:
                    entry = len(self.entry_block)
                    self.entry_block.append(b)
                    self.entry_first.append(batch)
                    entry_last.append(batch)
                    current[b] = entry
                entry_last[entry] = batch
                entries.append(entry)
            bounds = np.append(starts, len(block))
            self.batches.append((np.array(entries), BatchRows(blocks, bounds, local)))
        for entry, last in enumerate(entry_last):
            self.release_after.setdefault(last, []).append(entry)


class BatchProducer:
    """Generates ``(batch number, batch, skipped)`` for the rest of a rank's epoch stage
    in this process; runs in the background thread, schedule included, so
    ``iter(loader)`` returns at once. `finish` (host batch -> delivered batch: the user's
    transform, the copy to the GPU) runs on each batch."""

    def __init__(self, spec: BatchSpec, order: EpochOrder, plan: RankPlan, start: int, window: int,
                 epoch: int, finish, num_threads: int, allocate=None):
        self.spec, self.order, self.plan, self.start, self.window = spec, order, plan, start, window
        self.epoch, self.finish, self.num_threads = epoch, finish, num_threads
        self.allocate = allocate or (lambda name, shape, dtype: np.empty(shape, dtype))
        # Blocks held decoded or being read at once: the window being consumed plus the
        # next one (or one per reader thread, if more), so the readers decode the next
        # window while this one is consumed and memory stays at about two windows.
        self.max_live_blocks = window + max(num_threads, window)

    def __call__(self):
        spec = self.spec
        schedule = Schedule(spec, self.order, self.plan, self.start, self.window)
        builder = BatchBuilder(spec, self.epoch)
        readers, local = [], threading.local()
        lock = threading.Lock()

        def reader() -> BlockReader:
            current = getattr(local, "reader", None)
            if current is None:
                current = local.reader = BlockReader(spec.index, spec.read_columns,
                                                     lambda table, block: prepare_block(spec, table, block))
                with lock:
                    readers.append(current)
            return current

        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="distprop-read")
        decoded = {}
        first = np.array(schedule.entry_first, dtype=np.int64)
        submitted = 0
        try:
            for offset, (entries, rows) in enumerate(schedule.batches):
                batch = schedule.start + offset
                # Blocks this batch needs are read now; later ones while memory allows.
                due = int(np.searchsorted(first, batch, side="right"))
                while submitted < len(first) and (submitted < due or len(decoded) < self.max_live_blocks):
                    decoded[submitted] = pool.submit(lambda b: reader().read(b), schedule.entry_block[submitted])
                    submitted += 1
                sources = {schedule.entry_block[e]: decoded[e].result() for e in entries.tolist()}
                out = {name: self.allocate(name, (len(rows),) + shape, dtype)
                       for name, (dtype, shape) in spec.outputs.items()}
                result = builder.build(rows, sources.__getitem__, out)
                sources.clear()  # so released blocks are freed now, not after the next batch's reads
                for entry in schedule.release_after.get(batch, ()):
                    del decoded[entry]
                if result.size < len(rows):
                    out = {name: array[:result.size] for name, array in out.items()}
                yield batch, self.finish(out), result.skipped
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for current in readers:
                current.close()


class WorkerBatchProducer:
    """The same stream as `BatchProducer`, built by worker processes: the schedule
    decides each batch's samples here, a `WorkerPool` builds them in shared memory, and
    `finish` runs on each (on views of the shared memory, which stay valid as long
    as they are referenced)."""

    def __init__(self, pool, spec: BatchSpec, order: EpochOrder, plan: RankPlan, start: int, window: int,
                 epoch: int, finish):
        self.pool, self.spec, self.order, self.plan = pool, spec, order, plan
        self.start, self.window, self.epoch, self.finish = start, window, epoch, finish

    def __call__(self):
        schedule = Schedule(self.spec, self.order, self.plan, self.start, self.window)
        work = ((self.start + offset, rows) for offset, (_, rows) in enumerate(schedule.batches))
        for batch, arrays, skipped in self.pool.batches(self.epoch, work, f"epoch {self.epoch}"):
            yield batch, self.finish(arrays), skipped
