"""Shared memory among the ranks of a node: one segment, a slab per local rank,
and a barrier whose waiters sleep instead of spinning.

The segment is a file in /dev/shm that local rank 0 creates and reserves
(posix_fallocate, so a too-small /dev/shm -- 64 MB in a default Docker container --
is an error now, not a SIGBUS later), every local rank maps, and rank 0 removes
from the file system at once: nothing is left behind even if the job dies.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: each bucket starts on a cache line
SPIN_SECONDS = 200e-6  # how long NodeBarrier.wait(spin=True) polls before it sleeps


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


class NodeBarrier:
    """A barrier among the ranks of a node whose waiters sleep in the kernel.

    MPI's barrier polls: a rank that arrives first spins on a core until the last
    one arrives. When the node's ranks already use every core (one per core, or
    more ranks than cores) that spinning takes the very cycles the late rank needs
    to get there. Here each local rank owns a FIFO; arriving, a rank writes its
    local rank (one byte) into every other rank's FIFO, then reads its own until
    every other rank's token for this barrier is in -- a blocking read, so a waiter
    costs no CPU. A rank can be at most one barrier ahead of another (it cannot
    leave a barrier without that rank's token), so tokens are counted per sender
    and an early token for the next barrier is kept for it.

    The FIFOs live in a directory local rank 0 creates in /dev/shm and removes as
    soon as every rank has opened them (open FIFOs outlive their names).
    """

    def __init__(self, node_comm):
        self.local_rank, self.local_size = node_comm.Get_rank(), node_comm.Get_size()
        directory = error = None
        if self.local_size > 256:  # a token is one byte
            error = f"a node barrier serves at most 256 ranks, this node has {self.local_size}"
        elif self.local_rank == 0:
            try:
                directory = tempfile.mkdtemp(prefix="distprop-barrier-", dir=SHM_DIR)
                for k in range(self.local_size):
                    os.mkfifo(os.path.join(directory, str(k)), 0o600)
            except OSError as failure:
                error = f"cannot create the node barrier's FIFOs in {SHM_DIR}: {failure}"
        directory, error = node_comm.bcast((directory, error), root=0)
        self.fds, self._polling = [], None
        if error is None:
            try:  # O_RDWR: opening never waits for the other end, and writes never see EPIPE
                self.fds = [os.open(os.path.join(directory, str(k)), os.O_RDWR)
                            for k in range(self.local_size)]
                self._polling = os.open(os.path.join(directory, str(self.local_rank)),
                                        os.O_RDWR | os.O_NONBLOCK)  # my FIFO again, for spinning
            except OSError as failure:
                error = f"local rank {self.local_rank} cannot open the node barrier's FIFOs: {failure}"
        errors = [e for e in node_comm.allgather(error) if e]  # also: everyone has opened them
        if self.local_rank == 0 and directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        if errors:
            self.close()
            raise OSError("; ".join(dict.fromkeys(errors)))
        self.generation = 0
        self.received = [0] * self.local_size
        self._token = bytes([self.local_rank])

    def wait(self, spin: bool = False) -> None:
        """spin: poll for up to SPIN_SECONDS before sleeping -- for a caller whose core
        would otherwise idle, to whom a sleeping thread's wake-up (tens of
        microseconds, more in a virtual machine) is pure loss."""
        self.generation += 1
        for k, fd in enumerate(self.fds):
            if k != self.local_rank:
                os.write(fd, self._token)
        deadline = time.perf_counter() + SPIN_SECONDS if spin else 0.0
        while self._missing():
            if time.perf_counter() < deadline:
                try:
                    tokens = os.read(self._polling, 4096)
                except BlockingIOError:
                    continue
            else:
                tokens = os.read(self.fds[self.local_rank], 4096)
            for sender in tokens:
                self.received[sender] += 1

    def _missing(self) -> bool:
        return any(count < self.generation for k, count in enumerate(self.received) if k != self.local_rank)

    def close(self) -> None:
        for fd in self.fds + [self._polling]:
            if fd is not None:
                os.close(fd)
        self.fds, self._polling = [], None
