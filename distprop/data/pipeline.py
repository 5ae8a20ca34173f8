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

from distprop.data.batch import BatchBuilder, BatchRows, BatchSpec, prepare_block, prepare_head
from distprop.data.reader import BlockReader
from distprop.data.sampler import EpochOrder, RankPlan, ranges_length, slice_ranges


class Schedule:
    """Which blocks each remaining batch needs, and when each block is read and freed.

    A batch uses the blocks its samples come from and, packed, the first tokens
    (*head*) of the blocks its windows run on into: a window takes at most
    sequence_length tokens from the next block, whose own turn in the shuffled order
    may be far away, so only its first documents are read for it. A block (or head)
    is read once for each *run* of batches that use it: uses closer than `horizon`
    batches (the batches one shuffle window spans) share one read, so a block stays
    decoded while its window is being consumed; a later use (wrap-around padding, a
    re-sharded stretch) reads it again rather than pinning it in memory.
    """

    _CHUNK_SAMPLES = 1 << 18  # samples grouped in one vectorised pass (a few MB of index arrays)

    def __init__(self, spec: BatchSpec, order: EpochOrder, plan: RankPlan, start: int, window: int):
        self.start = start
        self.batches: list[tuple[np.ndarray, BatchRows]] = []  # (schedule entries used, rows) per batch
        self.entry_block: list[int] = []   # block read by each entry
        self.entry_head: list[bool] = []   # whether the entry reads only the block's head
        self.entry_first: list[int] = []   # first batch needing it
        self.release_after: dict[int, list[int]] = {}  # batch -> entries no longer needed after it
        horizon = -(-window * int(spec.samples_per_block.max()) // plan.batch_size) + 1
        current: dict[tuple[int, bool], int] = {}  # (block, head) -> its open entry
        entry_last: list[int] = []
        chunk = max(1, self._CHUNK_SAMPLES // plan.batch_size)
        for first in range(start, plan.num_batches, chunk):
            for batch, blocks, heads, rows in self._group(spec, order, plan, first,
                                                          min(first + chunk, plan.num_batches)):
                entries = []
                for key in [(b, False) for b in blocks.tolist()] + [(b, True) for b in heads]:
                    entry = current.get(key)
                    if entry is None or batch - entry_last[entry] > horizon:
                        entry = len(self.entry_block)
                        self.entry_block.append(key[0])
                        self.entry_head.append(key[1])
                        self.entry_first.append(batch)
                        entry_last.append(batch)
                        current[key] = entry
                    entry_last[entry] = batch
                    entries.append(entry)
                self.batches.append((np.array(entries), rows))
        for entry, last in enumerate(entry_last):
            self.release_after.setdefault(last, []).append(entry)

    @staticmethod
    def _group(spec: BatchSpec, order: EpochOrder, plan: RankPlan, first: int, end: int):
        """For batches first..end-1: ``(batch, its blocks, the blocks whose heads its windows
        run on into, its rows grouped by block)``, computed for all of them at once."""
        size = plan.batch_size
        positions = slice_ranges(plan.positions, first * size, min(end * size, ranges_length(plan.positions)))
        samples = np.concatenate([order.rows(lo, hi) for lo, hi in positions])
        batch = np.arange(len(samples)) // size
        block_first = spec.sample_block_starts  # first sample id of each block
        block = np.searchsorted(block_first, samples, side="right") - 1
        key = batch * len(block_first) + block
        grouping = np.argsort(key, kind="stable")  # by batch, then block; sample order kept within
        samples, block, key = samples[grouping], block[grouping], key[grouping]
        local = samples - block_first[block]
        group_starts = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
        group_bounds = np.searchsorted(group_starts, np.arange(end - first + 1) * size, side="left")
        heads: dict[int, set[int]] = {}
        if spec.packed is not None:  # windows that run on into the next block(s)
            last = spec.packed.last_block(samples)
            for i in np.flatnonzero(last > block).tolist():
                heads.setdefault(i // size, set()).update(range(int(block[i]) + 1, int(last[i]) + 1))
        for k in range(end - first):
            lo, hi = k * size, min((k + 1) * size, len(samples))
            starts = group_starts[group_bounds[k]:group_bounds[k + 1]]
            blocks = block[starts]
            ahead = sorted(heads.get(k, set()).difference(blocks.tolist()))
            yield first + k, blocks, ahead, BatchRows(blocks, np.append(starts - lo, hi - lo), local[lo:hi])


# Packed windows are built a unit of several batches at a time, about this many
# tokens: a batch of a few dozen windows costs more in fixed overhead (waiting on
# its blocks, allocating, one kernel call per block) than in copying tokens.
UNIT_TOKENS = 1 << 18
# Heads of packed blocks kept from whole reads, at most (see BatchProducer).
KEPT_HEAD_BYTES = 64 << 20


def batches_per_unit(spec: BatchSpec, batch_size: int) -> int:
    """How many consecutive batches are built together (1 but for packed windows)."""
    if spec.packed is None:
        return 1
    return max(1, UNIT_TOKENS // (batch_size * spec.tokens.sequence_length))


class BatchProducer:
    """Generates ``(batch number, batch, skipped)`` for the rest of a rank's epoch stage
    in this process; runs in the background thread, schedule included, so
    ``iter(loader)`` returns at once. `finish` (host batch -> delivered batch: the user's
    transform, the copy to the GPU) runs on each batch.

    Consecutive batches are built a unit at a time (`batches_per_unit`): into one
    allocation, of which each batch is a view, from the blocks all of them need."""

    def __init__(self, spec: BatchSpec, order: EpochOrder, plan: RankPlan, start: int, window: int,
                 epoch: int, finish, num_threads: int, allocate=None):
        self.spec, self.order, self.plan, self.start, self.window = spec, order, plan, start, window
        self.epoch, self.finish, self.num_threads = epoch, finish, num_threads
        self.allocate = allocate or (lambda name, shape, dtype: np.empty(shape, dtype))
        # Blocks held decoded or being read at once: the window being consumed plus the
        # next one (or one per reader thread, if more), so the readers decode the next
        # window while this one is consumed and memory stays at about two windows.
        self.max_live_blocks = window + max(num_threads, window)
        self.unit = batches_per_unit(spec, plan.batch_size)

    def __call__(self):
        spec = self.spec
        schedule = Schedule(spec, self.order, self.plan, self.start, self.window)
        builder = BatchBuilder(spec, self.epoch)
        readers, local = [], threading.local()
        lock = threading.Lock()

        # Packed: a block read whole keeps a copy of its head for a batch that needs only
        # the head later (in a shuffled order, about half of them), which then reads
        # nothing; a head costs a tenth of a whole read. A few KB each, bounded.
        headed_blocks = {block for block, head in zip(schedule.entry_block, schedule.entry_head) if head}
        kept_heads, most_kept = {}, 0
        if headed_blocks:
            most_kept = max(1, KEPT_HEAD_BYTES // (spec.tokens.sequence_length * spec.outputs["input_ids"][0].itemsize))

        def read(block: int, head: bool) -> dict:
            current = getattr(local, "reader", None)
            if current is None:
                current = local.reader = BlockReader(spec.index, spec.read_columns,
                                                     lambda table, block: prepare_block(spec, table, block))
                with lock:
                    readers.append(current)
            if head:
                kept = kept_heads.pop(block, None)
                return kept if kept is not None else prepare_head(spec, current, block)
            prepared = current.read(block)
            if block in headed_blocks and len(kept_heads) < most_kept:
                column = spec.tokens.column
                kept_heads[block] = {column: prepared[column].head(spec.tokens.sequence_length)}
            return prepared

        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="distprop-read")
        decoded = {}
        first = np.array(schedule.entry_first, dtype=np.int64)
        blocks, heads = schedule.entry_block, schedule.entry_head
        submitted = live = 0  # entries submitted; whole blocks among those not yet released
        try:
            for offset in range(0, len(schedule.batches), self.unit):
                unit = schedule.batches[offset:offset + self.unit]
                numbers = range(schedule.start + offset, schedule.start + offset + len(unit))
                # Blocks these batches need are read now; later ones while memory allows.
                due = int(np.searchsorted(first, numbers[-1], side="right"))
                while submitted < len(first) and (submitted < due or live < self.max_live_blocks):
                    decoded[submitted] = pool.submit(read, blocks[submitted], heads[submitted])
                    live += not heads[submitted]
                    submitted += 1
                # A batch reads a block whole or only its head; in a unit of several, one
                # batch may read a block whole and another its head: the whole one serves both.
                sources = {}
                for entry in np.concatenate([entries for entries, _ in unit]).tolist():
                    if not (heads[entry] and blocks[entry] in sources):
                        sources[blocks[entry]] = decoded[entry].result()
                rows = BatchRows.concatenate([batch_rows for _, batch_rows in unit])
                out = {name: self.allocate(name, (len(rows),) + shape, dtype)
                       for name, (dtype, shape) in spec.outputs.items()}
                result = builder.build(rows, sources.__getitem__, out)
                sources.clear()  # so released blocks are freed now, not after the next unit's reads
                for batch in numbers:
                    for entry in schedule.release_after.get(batch, ()):
                        del decoded[entry]
                        live -= not heads[entry]
                # Fewer samples than rows: images were skipped (their units are single batches).
                sizes = [len(batch_rows) for _, batch_rows in unit] if result.size == len(rows) else [result.size]
                start = 0
                for batch, size in zip(numbers, sizes):
                    part = {name: array[start:start + size] for name, array in out.items()}
                    yield batch, self.finish(part), result.skipped
                    start += size
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
