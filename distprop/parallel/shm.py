"""Gradient averaging through shared memory among the ranks of a node.

Every rank's bucket buffers live in one shared-memory segment per node, so ranks
read each other's gradients directly instead of passing messages. For a bucket,
local rank k owns the k-th chunk: it adds that chunk of every local rank's buffer
(in local-rank order), allreduces the chunk with the ranks that own it on the
other nodes (if any, over MPI), scales it by 1/size, and writes the result into
every local rank's buffer. Two node barriers fence the exchange. Each rank thus
reads and writes each gradient byte about once -- a ring or a message-based
allreduce on shared memory moves it several times -- and the division costs
nothing extra. Every rank ends with bitwise the same values: each chunk is
computed once (its owner's buffer first, then the others in local-rank order)
and copied.

The segment is a file in /dev/shm that local rank 0 creates and reserves
(posix_fallocate, so a too-small /dev/shm -- 64 MB in a default Docker container --
is an error now, not a SIGBUS later), every local rank maps, and rank 0 removes
from the file system at once: nothing is left behind even if the job dies.
"""

from __future__ import annotations

import mmap
import os
import uuid

import numpy as np

from distprop.parallel.reducer import BackgroundTransport

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: each bucket starts on a cache line


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def shared_memory_usable(comm, nbytes_per_rank: int) -> bool:
    """Whether every node can hold its ranks' buffers in /dev/shm: agreed by all ranks."""
    needed = nbytes_per_rank * comm.local_size
    try:
        stat = os.statvfs(SHM_DIR)
        fits = stat.f_bavail * stat.f_frsize > 2 * needed  # leave room for others
    except OSError:
        fits = False
    return bool(comm.allreduce(int(fits), "min"))


def _reserve(path: str, nbytes: int) -> str | None:
    """Create the segment's file with all its bytes allocated; None, or what went wrong."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as failure:
        return f"cannot create {path}: {failure}"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as failure:
        os.unlink(path)
        return f"cannot reserve {nbytes} bytes in {SHM_DIR}: {failure}"
    finally:
        os.close(fd)
    return None


class NodeSegment:
    """One shared-memory region per node; `slab(k)` is local rank k's part."""

    def __init__(self, node_comm, nbytes_per_rank: int):
        self.node = node_comm
        self.local_rank, self.local_size = node_comm.Get_rank(), node_comm.Get_size()
        self.per_rank = _aligned(max(nbytes_per_rank, 1))
        total = self.per_rank * self.local_size
        path = error = None
        if self.local_rank == 0:
            path = os.path.join(SHM_DIR, f"distprop-{uuid.uuid4().hex}")
            error = _reserve(path, total)
        path, error = node_comm.bcast((path, error), root=0)
        if error:
            raise OSError(error)
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                self.memory = mmap.mmap(fd, total)
            finally:
                os.close(fd)
            error = None
        except OSError as failure:  # e.g. ranks of one node that see different /dev/shm mounts
            error = f"local rank {self.local_rank} cannot map {path}: {failure}"
        errors = [e for e in node_comm.allgather(error) if e]  # also: everyone is done with the name
        if self.local_rank == 0:
            os.unlink(path)
        if errors:
            raise OSError("; ".join(errors))

    def slab(self, local_rank: int) -> np.ndarray:
        """Local rank `local_rank`'s bytes, as a uint8 array."""
        return np.frombuffer(self.memory, np.uint8, self.per_rank, local_rank * self.per_rank)


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
            offset += _aligned(count * np.dtype(dtype).itemsize)
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
