"""NCCL on a CUDA stream of its own, for GPU gradients."""

from __future__ import annotations

from distprop.parallel.transports.base import Work


class NcclTransport:
    """NCCL on its own CUDA stream: reductions queue after the gradients' kernels and
    the compute stream waits for them before the optimizer runs; no host blocking."""

    name = "nccl"

    def __init__(self, comm):
        self.comm = comm
        self.nccl = comm.nccl

    def start(self, bucket) -> Work:
        work = StreamWork(bucket, self.nccl)
        with self.nccl.after_current_work():
            gradient = bucket.flat_gradient()
            wire = bucket.wire if bucket.wire is not None else gradient
            bucket.compression.compress(gradient, wire, self.comm.size)
            self.nccl.allreduce_on_stream_(wire, bucket.compression.reduce_op)
            bucket.compression.decompress(wire, gradient, self.comm.size)
            work.event = self.nccl.record()
        return work

    def finish(self) -> None:
        pass

    def progress(self) -> None:
        pass

    def close(self) -> None:
        pass


class StreamWork(Work):
    """Done when the compute stream has been told to wait for NCCL's event."""

    def __init__(self, bucket, nccl):
        super().__init__(bucket)
        self.nccl, self.event = nccl, None

    def wait(self) -> None:
        self.nccl.make_current_wait(self.event)
