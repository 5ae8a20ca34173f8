"""Gradient averaging through shared memory among the ranks of a node.

Every rank's bucket buffers live in one shared-memory segment per node
(parallel.shm), back to back in bucket order, so ranks read each other's gradients
directly instead of passing messages. For a run of buckets, local rank k owns the
k-th chunk: it adds that chunk of every local rank's buffer (in local-rank order),
allreduces the chunk with the ranks that own it on the other nodes (if any, over
MPI), scales it by 1/size, and writes the result into every local rank's buffer.
Two node barriers fence the exchange. Each rank thus reads and writes each
gradient byte about once -- a ring or a message-based allreduce on shared memory
moves it several times -- and the chunk is summed, scaled and copied out in blocks
that stay in the core's cache, so scaling and copying out reread nothing from
memory. Every rank ends with bitwise the same values: each chunk is computed once
(its owner's buffer first, then the others in local-rank order) and copied.

When the reductions run (agreed by all ranks, see `spare_cores`; $DISTPROP_SHM_OVERLAP
chooses where set):
- where every rank has a core to spare for a reduction thread, each bucket is
  reduced on a background thread as soon as backward has finished it;
- where the ranks already occupy the cores (one rank per core, or more ranks than
  cores), a second thread has nothing to overlap on: it takes time from training
  and every hand-off to it is a wake-up. Then all buckets are reduced when backward
  ends, on the training thread, as one run: two barriers per step instead of two
  per bucket (measured on the MLP 784-1024-1024-10 on 2 ranks and 2 cores: 1.0 ms
  of CPU per step for its four buckets in the background, 0.55 ms as one run).
No thread here ever spins: barriers sleep (parallel.shm.NodeBarrier) where MPI's
would poll; only the training thread, once backward is over, polls briefly before
it sleeps -- and only where the node has a core to spare for every rank.
"""

from __future__ import annotations

import os

import numpy as np

from distprop.cpu_threads import get_num_threads
from distprop.parallel.ring import sum_in_place
from distprop.parallel.shm import NodeBarrier, NodeSegment, aligned
from distprop.parallel.transports.base import BlockingTransport


# Elements per block of the sum/scale/copy passes: 256 KiB of float32, which stays
# in L2 between the passes (measured on a 7.45 MB MLP gradient: 0.63 -> 0.40 ms).
BLOCK_ELEMENTS = 1 << 16
# Overrides the choice of mode (1: background thread, 0: at the end of backward),
# e.g. to compare the two, or to see reductions overlap backward in a timeline.
OVERLAP_VARIABLE = "DISTPROP_SHM_OVERLAP"


class ShmTransport(BlockingTransport):
    """Bucket reductions through a node's shared memory, in bucket order (see the
    module docstring). Host arrays only."""

    name = "shm"

    def __init__(self, comm, layouts, overlap: bool | None = None):
        """layouts: (number of elements, dtype) of each bucket, in bucket order.
        overlap: reduce each bucket on a background thread during backward (True) or
        all of them on the training thread when backward ends (False); None takes
        $DISTPROP_SHM_OVERLAP (1 or 0) where set, else decides from the node's
        cores (`spare_cores`)."""
        from mpi4py import MPI

        if overlap is None:
            overlap = _overlap_from_environment()  # checked before anything is allocated
        self.MPI = MPI
        self.comm = comm
        world = comm.mpi_comm
        self.node = world.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        self.cross = world.Split(color=comm.local_rank, key=comm.rank)  # my peers on other nodes
        self.offsets, offset = [], 0
        for count, dtype in layouts:
            self.offsets.append(offset)
            offset += aligned(count * np.dtype(dtype).itemsize)
        self.barrier = None
        try:
            self.segment = NodeSegment(self.node, offset)
            self.barrier = NodeBarrier(self.node)
            failure = None
        except OSError as error:  # raised on every rank of that node: other nodes must hear of it
            failure = str(error)
        failures = comm.allgather_object(failure)
        if any(failures):
            self._free_communicators()
            raise OSError("shared-memory transport: " + "; ".join(
                f"rank {rank}: {text}" for rank, text in enumerate(failures) if text))
        self.layouts = layouts
        has_spare_core = spare_cores(comm) >= 1
        if overlap is None:
            overlap = has_spare_core
        # Every rank must run the same barriers: the choice is the job's, not the rank's.
        overlap = bool(comm.allreduce(int(overlap), "min"))
        # Polling at a barrier pays only on a core nobody else needs: on 2 ranks and 2
        # cores shared with other work it took 0.1 ms of CPU per barrier.
        self.may_spin = has_spare_core
        super().__init__(background=overlap)

    def buffer(self, index: int, local_rank: int | None = None) -> np.ndarray:
        """Bucket `index`'s flat buffer in local rank `local_rank`'s slab (default: mine)."""
        count, dtype = self.layouts[index]
        return self._span(self.offsets[index], count, np.dtype(dtype), local_rank)

    def bucket_buffers(self):
        return [self.buffer(i) for i in range(len(self.layouts))]

    def _span(self, start: int, count: int, dtype: np.dtype, local_rank: int | None = None) -> np.ndarray:
        rank = self.comm.local_rank if local_rank is None else local_rank
        return self.segment.slab(rank)[start:start + count * dtype.itemsize].view(dtype)

    def reduce(self, bucket, idle: bool) -> None:
        self.reduce_all([bucket], idle)

    def reduce_all(self, buckets: list, idle: bool) -> None:
        """Buckets of one dtype lie back to back in the segment (the padding between
        them is zeros, and stays zeros): each such run is reduced as one span."""
        what = buckets[0].describe() if len(buckets) == 1 else f"buckets {buckets[0].index}-{buckets[-1].index}"
        with self.comm._guard(f"shared-memory allreduce of {what}"):
            for first, last in _runs([b.index for b in buckets], self.layouts):
                count, dtype = self.layouts[last]
                dtype = np.dtype(dtype)
                start = self.offsets[first]
                total = (self.offsets[last] - start) // dtype.itemsize + count
                self._reduce_span(start, total, dtype, idle)

    def _reduce_span(self, start: int, count: int, dtype: np.dtype, idle: bool) -> None:
        local_size = self.segment.local_size
        chunk = -(-count // local_size)
        lo, hi = min(count, self.comm.local_rank * chunk), min(count, (self.comm.local_rank + 1) * chunk)
        mine = self._span(start, count, dtype)[lo:hi]
        others = [self._span(start, count, dtype, k)[lo:hi] for k in range(local_size)
                  if k != self.comm.local_rank]
        spin = idle and self.may_spin
        self.barrier.wait(spin=spin)  # every local rank has staged these gradients
        if hi > lo:
            summed = self.cross.Get_size() > 1
            if summed:  # the node's sum of my chunk, then its sum over the nodes
                for other in others:
                    mine += other
                sum_in_place(self.cross, mine, self.MPI, self.comm.ring)
            scale = mine.dtype.type(1.0 / self.comm.size)
            for block in _blocks(hi - lo):  # each block summed, scaled and copied out while in cache
                part = mine[block]
                if not summed:
                    for other in others:
                        part += other[block]
                part *= scale
                for other in others:
                    other[block] = part
        self.barrier.wait(spin=spin)  # every chunk is in every buffer

    def _free_communicators(self) -> None:
        if self.barrier is not None:
            self.barrier.close()
        self.node.Free()
        self.cross.Free()


def spare_cores(comm) -> float:
    """Cores this rank may use beyond its compute threads: of the cores it is bound
    to, if the launcher bound it, else its share of what the node's ranks leave free."""
    threads = getattr(comm, "threads", None) or get_num_threads()
    node = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    if allowed < node:
        return allowed - threads
    return (node - comm.local_size * threads) / comm.local_size


def _overlap_from_environment() -> bool | None:
    text = os.environ.get(OVERLAP_VARIABLE, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"${OVERLAP_VARIABLE} must be 1 (a background thread) or 0 (at the end of "
                         f"backward), got {text!r}")
    return None if not text else text == "1"


def _runs(indices: list[int], layouts) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive bucket indices of one dtype."""
    runs = []
    for index in indices:
        if runs and index == runs[-1][1] + 1 and np.dtype(layouts[index][1]) == np.dtype(layouts[runs[-1][1]][1]):
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _blocks(count: int):
    return (slice(lo, min(lo + BLOCK_ELEMENTS, count)) for lo in range(0, count, BLOCK_ELEMENTS))
