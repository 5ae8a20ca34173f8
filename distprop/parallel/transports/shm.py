"""Gradient averaging through shared memory among the ranks of a node.

Every rank's bucket buffers live in one shared-memory segment per node
(parallel.shm), so ranks read each other's gradients directly instead of passing
messages. For a bucket, local rank k owns the k-th chunk: it adds that chunk of
every local rank's buffer (in local-rank order), allreduces the chunk with the
ranks that own it on the other nodes (if any, over MPI), scales it by 1/size, and
writes the result into every local rank's buffer. Two node barriers fence the
exchange. Each rank thus reads and writes each gradient byte about once -- a ring
or a message-based allreduce on shared memory moves it several times -- and the
chunk is summed, scaled and copied out in blocks that stay in the core's cache, so
scaling and copying out reread nothing from memory. Every rank ends with bitwise
the same values: each chunk is computed once (its owner's buffer first, then the
others in local-rank order) and copied.

The ranks of a node usually occupy all its cores, so the background thread
competes with training for them: it must never spin. Its barriers sleep
(parallel.shm.NodeBarrier) where MPI's would poll; only the training thread,
running what is left once backward is over, polls briefly before it sleeps -- when
the node has a core for each of its ranks' threads.
"""

from __future__ import annotations

import os

import numpy as np

from distprop.parallel.shm import NodeBarrier, NodeSegment, aligned
from distprop.parallel.transports.base import BackgroundTransport


# Elements per block of the sum/scale/copy passes: 256 KiB of float32, which stays
# in L2 between the passes (measured on a 7.45 MB MLP gradient: 0.63 -> 0.40 ms).
BLOCK_ELEMENTS = 1 << 16


class ShmTransport(BackgroundTransport):
    """Bucket reductions through a node's shared memory, in submission order, on a
    background thread (see the module docstring). Host arrays only."""

    name = "shm"

    def __init__(self, comm, layouts):
        """layouts: (number of elements, dtype) of each bucket, in bucket order."""
        from mpi4py import MPI

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
        # Polling pays only where no other rank of the node waits for this core.
        self.may_spin = comm.local_size * getattr(comm, "threads", 1) <= (os.cpu_count() or 1)
        super().__init__()

    def buffer(self, index: int, local_rank: int | None = None) -> np.ndarray:
        """Bucket `index`'s flat buffer in local rank `local_rank`'s slab (default: mine)."""
        count, dtype = self.layouts[index]
        rank = self.comm.local_rank if local_rank is None else local_rank
        start = self.offsets[index]
        raw = self.segment.slab(rank)[start:start + count * np.dtype(dtype).itemsize]
        return raw.view(dtype)

    def bucket_buffers(self):
        return [self.buffer(i) for i in range(len(self.layouts))]

    def _reduce(self, index: int, idle: bool) -> None:
        count, dtype = self.layouts[index]
        local_size = self.segment.local_size
        chunk = -(-count // local_size)
        lo, hi = min(count, self.comm.local_rank * chunk), min(count, (self.comm.local_rank + 1) * chunk)
        mine = self.buffer(index)[lo:hi]
        others = [self.buffer(index, k)[lo:hi] for k in range(local_size) if k != self.comm.local_rank]
        spin = idle and self.may_spin
        self.barrier.wait(spin=spin)  # every local rank has staged this bucket
        if hi > lo:
            summed = self.cross.Get_size() > 1
            if summed:  # the node's sum of my chunk, then its sum over the nodes
                for other in others:
                    mine += other
                self.cross.Allreduce(self.MPI.IN_PLACE, mine)
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

    def reduce(self, bucket, idle: bool) -> None:
        with self.comm._guard(f"shared-memory allreduce of {bucket.describe()}"):
            self._reduce(bucket.index, idle)

    def _free_communicators(self) -> None:
        if self.barrier is not None:
            self.barrier.close()
        self.node.Free()
        self.cross.Free()


def _blocks(count: int):
    return (slice(lo, min(lo + BLOCK_ELEMENTS, count)) for lo in range(0, count, BLOCK_ELEMENTS))
