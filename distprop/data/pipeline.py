"""One rank's epoch as a stream of assembled batches: which blocks each batch needs,
reading them on a pool of threads with bounded read-ahead, and gathering each
batch's rows with one copy per column.

Runs inside the loader's background thread (see `distprop.data.prefetch`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from distprop.data.index import DatasetIndex
from distprop.data.reader import BlockReader
from distprop.data.sampler import EpochOrder, RankPlan


@dataclass(frozen=True)
class _BatchRows:
    """One batch's rows, grouped by block: rows block_local[bounds[j]:bounds[j+1]] come
    from the block that schedule entry entries[j] reads."""

    entries: np.ndarray
    bounds: np.ndarray
    block_local: np.ndarray


class Schedule:
    """Which blocks each remaining batch needs, and when each block is read and freed.

    A block is read once for each *run* of batches that use it: uses closer than
    `horizon` batches (the batches one shuffle window spans) share one read, so a
    block stays decoded while its window is being consumed; a later use (wrap-around
    padding, a re-sharded stretch) reads it again rather than pinning it in memory.
    """

    def __init__(self, index: DatasetIndex, order: EpochOrder, plan: RankPlan, start: int, window: int):
        self.start = start
        self.batches: list[_BatchRows] = []
        self.entry_block: list[int] = []   # block read by each entry
        self.entry_first: list[int] = []   # first batch needing it
        self.release_after: dict[int, list[int]] = {}  # batch -> entries no longer needed after it
        horizon = -(-window * int(index.block_rows.max()) // plan.batch_size) + 1
        current: dict[int, int] = {}       # block -> its open entry
        entry_last: list[int] = []
        for batch in range(start, plan.num_batches):
            rows = np.concatenate([order.rows(lo, hi) for lo, hi in plan.batch_positions(batch)])
            block, local = index.block_of_rows(rows)
            grouping = np.argsort(block, kind="stable")
            block, local = block[grouping], local[grouping]
            blocks, starts = np.unique(block, return_index=True)
            entries = []
            for b in blocks.tolist():
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
            self.batches.append(_BatchRows(np.array(entries), bounds, local))
        for entry, last in enumerate(entry_last):
            self.release_after.setdefault(last, []).append(entry)


class BatchProducer:
    """Generates ``(batch number, batch)`` for the rest of a rank's epoch stage; runs in
    the background thread, schedule included, so ``iter(loader)`` returns at once."""

    def __init__(self, index: DatasetIndex, order: EpochOrder, plan: RankPlan, start: int, window: int,
                 transform, feeder, num_workers: int):
        self.index, self.order, self.plan, self.start, self.window = index, order, plan, start, window
        self.transform, self.feeder, self.num_workers = transform, feeder, num_workers
        # Blocks held decoded or being read at once: the window being consumed plus the
        # next one (or one per reader thread, if more), so the readers decode the next
        # window while this one is consumed and memory stays at about two windows.
        self.max_live_blocks = window + max(num_workers, window)

    def __call__(self):
        schedule = Schedule(self.index, self.order, self.plan, self.start, self.window)
        readers, local = [], threading.local()
        lock = threading.Lock()

        def read(block: int):
            reader = getattr(local, "reader", None)
            if reader is None:
                reader = local.reader = BlockReader(self.index)
                with lock:
                    readers.append(reader)
            return reader.read(block)

        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="distprop-read")
        decoded = {}
        first = np.array(schedule.entry_first, dtype=np.int64)
        submitted = 0
        try:
            for offset, rows in enumerate(schedule.batches):
                batch = schedule.start + offset
                # Blocks this batch needs are read now; later ones while memory allows.
                due = int(np.searchsorted(first, batch, side="right"))
                while submitted < len(first) and (submitted < due or len(decoded) < self.max_live_blocks):
                    decoded[submitted] = pool.submit(read, schedule.entry_block[submitted])
                    submitted += 1
                sources = [decoded[e].result() for e in rows.entries.tolist()]
                out = self._assemble(rows, sources)
                del sources  # so released blocks are freed now, not after the next batch's reads
                for entry in schedule.release_after.get(batch, ()):
                    del decoded[entry]
                if self.transform is not None:
                    out = self.transform(out)
                if self.feeder is not None:
                    out = self.feeder.to_device(out)
                yield batch, out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for reader in readers:
                reader.close()

    def _assemble(self, rows: _BatchRows, sources: list[dict]) -> dict:
        size = int(rows.bounds[-1])
        stage_in_pinned = self.feeder is not None and self.transform is None
        batch = {}
        for name, spec in self.index.columns.items():
            shape = (size,) + spec.shape
            out = self.feeder.host_buffer(name, shape, spec.dtype) if stage_in_pinned \
                else np.empty(shape, spec.dtype)
            for j, source in enumerate(sources):
                lo, hi = rows.bounds[j], rows.bounds[j + 1]
                # mode="clip" lets numpy write straight into `out` (mode="raise" buffers);
                # the indices are in range by construction.
                np.take(source[name], rows.block_local[lo:hi], axis=0, out=out[lo:hi], mode="clip")
            batch[name] = out
        return batch
