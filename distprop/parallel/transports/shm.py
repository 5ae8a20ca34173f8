"""Gradient averaging through shared memory among the ranks of a node.

Every rank's bucket buffers live in one shared-memory segment per node
(parallel.shm), so ranks read each other's gradients directly instead of passing
messages. For a bucket, local rank k owns the k-th chunk: it adds that chunk of
every local rank's buffer (in local-rank order), allreduces the chunk with the
ranks that own it on the other nodes (if any, over MPI), scales it by 1/size, and
writes the result into every local rank's buffer. Two node barriers fence the
exchange. Each rank thus reads and writes each gradient byte about once -- a ring
or a message-based allreduce on shared memory moves it several times -- and the
division costs nothing extra. Every rank ends with bitwise the same values: each
chunk is computed once (its owner's buffer first, then the others in local-rank
order) and copied.
"""

from __future__ import annotations

import numpy as np

from distprop.parallel.shm import NodeSegment, aligned
from distprop.parallel.transports.base import BackgroundTransport


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
        try:
            self.segment = NodeSegment(self.node, offset)
            failure = None
        except OSError as error:  # raised on every rank of that node: other nodes must hear of it
            failure = str(error)
        failures = comm.allgather_object(failure)
        if any(failures):
            self._free_communicators()
            raise OSError("shared-memory transport: " + "; ".join(
                f"rank {rank}: {text}" for rank, text in enumerate(failures) if text))
        self.layouts = layouts
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

    def _reduce(self, index: int) -> None:
        count, dtype = self.layouts[index]
        local_size = self.segment.local_size
        chunk = -(-count // local_size)
        lo, hi = min(count, self.comm.local_rank * chunk), min(count, (self.comm.local_rank + 1) * chunk)
        mine = self.buffer(index)[lo:hi]
        others = [self.buffer(index, k)[lo:hi] for k in range(local_size) if k != self.comm.local_rank]
        self.node.Barrier()  # every local rank has staged this bucket
        if hi > lo:
            for other in others:  # my chunk of the sum, in my own buffer: no scratch
                mine += other
            if self.cross.Get_size() > 1:
                self.cross.Allreduce(self.MPI.IN_PLACE, mine)
            mine *= mine.dtype.type(1.0 / self.comm.size)
            for other in others:
                other[...] = mine
        self.node.Barrier()  # every chunk is in every buffer

    def reduce(self, bucket) -> None:
        with self.comm._guard(f"shared-memory allreduce of {bucket.describe()}"):
            self._reduce(bucket.index)

    def _free_communicators(self) -> None:
        self.node.Free()
        self.cross.Free()
