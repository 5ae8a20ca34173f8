"""Gradient transports: how the reducer's buckets are averaged over the ranks.

- `shm` (transports.shm): through a node's shared memory, MPI between nodes;
- `thread` (transports.thread): blocking MPI allreduces on a background thread;
- `iallreduce` (transports.iallreduce): MPI nonblocking collectives;
- `nccl` (transports.nccl): NCCL on a CUDA stream, for GPU gradients.
`base` holds what they share. `make_transport` picks one, alike on every rank.
"""

from __future__ import annotations

import sys

import numpy as np

TRANSPORTS = (None, "shm", "thread", "iallreduce")


def make_transport(kind, comm, on_gpu: bool, layouts, compression):
    """The transport for `kind` (None: the fastest that applies), given the buckets'
    (element count, dtype) layouts. GPU gradients with NCCL always use NCCL."""
    from distprop.parallel.transports.iallreduce import IallreduceTransport
    from distprop.parallel.transports.thread import ThreadTransport

    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    if on_gpu:
        if getattr(comm, "nccl", None) is not None:
            from distprop.parallel.transports.nccl import NcclTransport

            return NcclTransport(comm)
        if kind == "iallreduce" or kind == "shm":
            raise ValueError(f"transport={kind!r} needs host arrays; GPU gradients use NCCL or 'thread'")
        return ThreadTransport(comm)
    automatic = kind is None
    if automatic:
        kind = "shm" if _shm_applies(comm, layouts, compression) else "thread"
    if kind == "shm":
        from distprop.parallel.transports.shm import ShmTransport

        if compression.wire_dtype is not None:
            raise ValueError("compression does not apply to transport='shm' (no wire to narrow)")
        try:
            return ShmTransport(comm, layouts)
        except OSError as error:  # raised on every rank alike, so all fall back alike
            if not automatic:
                raise
            if comm.rank == 0:
                print(f"distprop: {error}; gradients are reduced with transport='thread'", file=sys.stderr)
    if kind == "iallreduce":
        return IallreduceTransport(comm)
    return ThreadTransport(comm)


def _shm_applies(comm, layouts, compression) -> bool:
    """Shared memory pays where ranks share a node, every node has as many ranks
    (chunks are matched across nodes), and /dev/shm has room -- agreed by all ranks."""
    from distprop.parallel.shm import ALIGN, shared_memory_usable

    if compression.wire_dtype is not None or comm.local_size == 1 or not hasattr(comm, "mpi_comm"):
        return False
    sizes = comm.allreduce(np.array([comm.local_size, -comm.local_size]), "max")
    if sizes[0] != -sizes[1]:
        return False
    nbytes = sum(count * np.dtype(dtype).itemsize + ALIGN for count, dtype in layouts)
    return shared_memory_usable(comm, nbytes)
