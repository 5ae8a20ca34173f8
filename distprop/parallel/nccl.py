"""NCCL collectives on GPU (cupy) buffers, bootstrapped over MPI.

Rank 0 creates NCCL's unique id, MPI broadcasts it, every rank builds its NCCL
communicator on its own GPU. Collectives are queued on a stream of their own, after
the work already queued on the caller's stream, and the caller's stream is made to
wait for them: nothing blocks the host.
"""

from __future__ import annotations

import contextlib

import numpy as np

from distprop import backend


def nccl_available() -> bool:
    return backend.nccl_module() is not None


class NcclCommunicator:
    def __init__(self, mpi_comm):
        cp, nccl = backend.cupy_module(), backend.nccl_module()
        self.cp, self.nccl = cp, nccl
        self.size = mpi_comm.Get_size()
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, mpi_comm.Get_rank())
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._dtypes = {
            np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float64): nccl.NCCL_FLOAT64, np.dtype(np.int32): nccl.NCCL_INT32,
            np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint8): nccl.NCCL_UINT8,
        }
        self._ops = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN,
                     "bf16_sum": nccl.NCCL_SUM}

    def _nccl_dtype(self, array, op):
        if op == "bf16_sum":  # uint16 arrays holding bfloat16 bits
            return self.nccl.NCCL_BFLOAT16
        dtype = np.dtype(array.dtype)
        if dtype not in self._dtypes:
            raise TypeError(f"NCCL cannot reduce arrays of dtype {dtype}")
        return self._dtypes[dtype]

    @contextlib.contextmanager
    def after_current_work(self):
        """Queue the block's GPU work on NCCL's stream, after what the caller's stream
        has queued so far (the gradients it reduces)."""
        ready = self.cp.cuda.get_current_stream().record()
        self.stream.wait_event(ready)
        with self.stream:
            yield

    def allreduce_on_stream_(self, array, op="sum"):
        """In-place allreduce queued on NCCL's stream (call inside after_current_work);
        for 'mean' the division is queued after it."""
        if not array.flags.c_contiguous:
            raise ValueError("NCCL allreduce needs a C-contiguous array")
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._nccl_dtype(array, op),
                            self._ops[op], self.stream.ptr)
        if op == "mean":
            array *= array.dtype.type(1.0 / self.size)

    def record(self):
        """An event that completes when NCCL's stream has done all queued so far."""
        return self.stream.record()

    def make_current_wait(self, event) -> None:
        """Make the caller's stream wait for `event` (the host does not block)."""
        self.cp.cuda.get_current_stream().wait_event(event)

    def allreduce_(self, array, op="sum"):
        with self.after_current_work():
            self.allreduce_on_stream_(array, op)
        self.make_current_wait(self.record())
        return array

    def allgather(self, array):
        array = self.cp.ascontiguousarray(array)
        out = self.cp.empty((self.size,) + array.shape, array.dtype)
        with self.after_current_work():
            self.comm.allGather(array.data.ptr, out.data.ptr, array.size, self._nccl_dtype(array, "sum"),
                                self.stream.ptr)
        self.make_current_wait(self.record())
        return out

    def bcast_(self, array, root=0):
        if not array.flags.c_contiguous:  # NCCL sees only the pointer: a view's strides would be ignored
            raise ValueError("NCCL broadcast needs a C-contiguous array")
        with self.after_current_work():
            self.comm.bcast(array.data.ptr, array.size, self._nccl_dtype(array, "sum"), root, self.stream.ptr)
        self.make_current_wait(self.record())
        return array
