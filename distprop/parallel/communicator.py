"""Communicators: the collectives distprop needs, over MPI or within one process.

`Communicator` is the small interface the rest of distprop uses. `MPICommunicator`
implements it with mpi4py (host buffers directly; GPU buffers through NCCL where
present, else staged through host memory). `SingleProcessCommunicator` is the
size-1 case with no MPI at all. Every collective is announced to the watchdog
(when one is attached), so a collective that never completes is reported by name
-- except NCCL's, which the watchdog sees only while they are queued: they run
later, on the GPU, and a hang there shows up at the next synchronisation.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from distprop.backend import get_array_module, is_gpu_array, to_device
from distprop.parallel.compression import mpi_bf16_sum_op
from distprop.parallel.ring import ring_allowed, sum_in_place

# "bf16_sum" adds uint16 arrays that hold bfloat16 bits (see parallel.compression).
ABORT_GRACE_SECONDS = 1.0

_OPS = ("sum", "mean", "max", "min", "bf16_sum")


def _check_op(op: str, array=None) -> None:
    if op not in _OPS:
        raise ValueError(f"reduction op must be one of {_OPS}, got {op!r}")
    if op == "mean" and array is not None and array.dtype.kind not in "fc":
        raise TypeError(f"an in-place 'mean' needs a floating-point array, got {array.dtype} "
                        "(allreduce(value, 'mean') returns a float copy)")


class Communicator:
    """A group of processes and the collectives between them.

    Attributes: `rank`, `size` (the job), `local_rank`, `local_size` (this node).
    Every rank must call the same collectives in the same order.
    """

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    watchdog = None

    def allreduce_(self, array, op: str = "sum"):
        """Reduce a contiguous numpy or cupy array over all ranks, in place."""
        raise NotImplementedError

    def bcast_(self, array, root: int = 0):
        """Overwrite `array` on every rank with root's, in place."""
        raise NotImplementedError

    def allgather(self, array):
        """Every rank's array (same shape and dtype everywhere), stacked in rank order:
        shape (size, *array.shape)."""
        raise NotImplementedError

    def bcast_object(self, obj, root: int = 0):
        """Root's Python object (pickled in memory, never from disk) on every rank."""
        raise NotImplementedError

    def allgather_object(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def dup(self) -> "Communicator":
        """A communicator over the same ranks whose traffic never mixes with this one's
        (background threads get their own, so their collectives cannot interleave)."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End every process of the job now."""
        raise SystemExit(code)

    def free(self) -> None:
        """Release a communicator made by `dup()` (MPI has a limited number of them)."""

    # ---- conveniences built on the primitives above -------------------------
    def allreduce(self, value, op: str = "sum"):
        """The reduction of a number or array over all ranks (a new value; the input
        is untouched). Python numbers come back as Python floats/ints."""
        _check_op(op)
        if isinstance(value, (int, float, np.integer, np.floating)):
            exact = isinstance(value, (int, np.integer)) and op != "mean"
            array = np.array([value], dtype=np.int64 if exact else np.float64)
            self.allreduce_(array, op)
            return array[0].item()
        xp = get_array_module(value)
        array = xp.array(value, copy=True)
        if op == "mean" and array.dtype.kind not in "fc":
            array = array.astype(np.float64)
        self.allreduce_(array, op)
        return array

    def _guard(self, what: str):
        return self.watchdog.track(what) if self.watchdog is not None else contextlib.nullcontext()


class SingleProcessCommunicator(Communicator):
    """One process, no MPI: every collective is the identity."""

    def allreduce_(self, array, op="sum"):
        _check_op(op, array)
        return array

    def bcast_(self, array, root=0):
        return array

    def allgather(self, array):
        return array[None].copy()

    def bcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def barrier(self):
        pass

    def dup(self):
        return self

    def __repr__(self):
        return "SingleProcessCommunicator(rank=0, size=1)"


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (COMM_WORLD by default)."""

    def __init__(self, mpi_comm=None, watchdog=None, nccl=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.mpi_comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.mpi_comm.Get_rank(), self.mpi_comm.Get_size()
        node = self.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.watchdog = watchdog
        self.nccl = nccl  # a parallel.nccl.NcclCommunicator for GPU buffers, or None
        self._mpi_ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        # Large sums may go round distprop's ring (parallel.ring): all ranks or none.
        self.ring = bool(self.mpi_comm.allreduce(int(ring_allowed()), op=MPI.MIN))

    def allreduce_(self, array, op="sum"):
        _check_op(op, array)
        if is_gpu_array(array):
            return self._allreduce_gpu_(array, op)
        if not array.flags.c_contiguous:
            raise ValueError("allreduce_ needs a C-contiguous array (a reduction into a copy would be lost)")
        mpi_op = mpi_bf16_sum_op() if op == "bf16_sum" else self._mpi_ops[op]
        with self._guard(f"allreduce({op}, {array.nbytes} bytes)"):
            if op in ("sum", "mean"):  # by distprop's ring where it pays (parallel.ring)
                sum_in_place(self.mpi_comm, array, self.MPI, self.ring)
            else:
                self.mpi_comm.Allreduce(self.MPI.IN_PLACE, array, op=mpi_op)
        if op == "mean":
            array /= self.size
        return array

    def _allreduce_gpu_(self, array, op):
        if self.nccl is not None:
            with self._guard(f"nccl allreduce({op}, {array.nbytes} bytes)"):
                self.nccl.allreduce_(array, op)
            return array
        host = to_device(array, "cpu")  # no GPU-aware path: stage through the host
        self.allreduce_(host, op)
        array[...] = to_device(host, "gpu")
        return array

    def bcast_(self, array, root=0):
        if is_gpu_array(array):
            if self.nccl is not None:
                with self._guard(f"nccl broadcast({array.nbytes} bytes)"):
                    self.nccl.bcast_(array, root)
                return array
            host = to_device(array, "cpu")
            self.bcast_(host, root)
            array[...] = to_device(host, "gpu")
            return array
        if not array.flags.c_contiguous:
            raise ValueError("bcast_ needs a C-contiguous array")
        with self._guard(f"broadcast({array.nbytes} bytes)"):
            self.mpi_comm.Bcast(array, root=root)
        return array

    def allgather(self, array):
        xp = get_array_module(array)
        if is_gpu_array(array):
            if self.nccl is not None:
                with self._guard(f"nccl allgather({array.nbytes} bytes)"):
                    return self.nccl.allgather(array)
            return to_device(self.allgather(to_device(array, "cpu")), "gpu")
        send = xp.ascontiguousarray(array)
        out = xp.empty((self.size,) + array.shape, array.dtype)
        with self._guard(f"allgather({array.nbytes} bytes)"):
            self.mpi_comm.Allgather(send, out)
        return out

    def bcast_object(self, obj, root=0):
        with self._guard("broadcast(object)"):
            return self.mpi_comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        with self._guard("allgather(object)"):
            return self.mpi_comm.allgather(obj)

    def barrier(self):
        with self._guard("barrier"):
            self.mpi_comm.Barrier()

    def dup(self):
        twin = MPICommunicator.__new__(MPICommunicator)
        twin.__dict__.update(self.__dict__)
        twin.mpi_comm = self.mpi_comm.Dup()
        twin._made_by_dup = True
        return twin

    def abort(self, code=1):
        # The launcher forwards our output asynchronously and MPI_Abort kills the
        # forwarding too (MPICH's does): give the report that usually precedes an
        # abort a moment to reach the user.
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        self.mpi_comm.Abort(code)

    def free(self):
        if self.__dict__.pop("_made_by_dup", False):  # never the job's own communicator
            self.mpi_comm.Free()

    def __repr__(self):
        return (f"MPICommunicator(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")
