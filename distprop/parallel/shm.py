"""Shared memory among the ranks of a node: one segment, a slab per local rank.

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

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: each bucket starts on a cache line


def aligned(nbytes: int) -> int:
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
        self.per_rank = aligned(max(nbytes_per_rank, 1))
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
