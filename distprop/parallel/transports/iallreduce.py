"""MPI nonblocking allreduces, started and progressed from the training thread."""

from __future__ import annotations

from distprop.parallel.transports.base import Work


class IallreduceWork(Work):
    def __init__(self, bucket, request, comm):
        super().__init__(bucket)
        self.request, self.comm = request, comm

    def wait(self) -> None:
        with self.comm._guard(f"allreduce of {self.bucket.describe()}"):
            self.request.Wait()
        bucket = self.bucket
        gradient = bucket.flat_gradient()
        bucket.compression.decompress(bucket.wire if bucket.wire is not None else gradient, gradient,
                                      self.comm.size)


class IallreduceTransport:
    """MPI_Iallreduce per bucket, started from the training thread; MPI progresses it
    whenever the training thread enters MPI (each gradient hook tests the requests)."""

    name = "iallreduce"

    def __init__(self, comm):
        from mpi4py import MPI

        from distprop.parallel.compression import mpi_bf16_sum_op

        self.MPI = MPI
        self.comm = comm.dup()
        self._bf16_op = mpi_bf16_sum_op
        self._pending = []  # requests to progress; completed ones are dropped at the next start

    def start(self, bucket) -> Work:
        gradient = bucket.flat_gradient()
        wire = bucket.wire if bucket.wire is not None else gradient
        bucket.compression.compress(gradient, wire, self.comm.size)
        op = self._bf16_op() if bucket.compression.reduce_op == "bf16_sum" else self.MPI.SUM
        request = self.comm.mpi_comm.Iallreduce(self.MPI.IN_PLACE, wire, op=op)
        self._pending = [r for r in self._pending if r != self.MPI.REQUEST_NULL]  # Wait() nulls them
        self._pending.append(request)
        return IallreduceWork(bucket, request, self.comm)

    def finish(self) -> None:
        pass

    def progress(self) -> None:
        if self._pending:
            self.MPI.Request.Testall(self._pending)

    def close(self) -> None:
        self._pending = []
        self.comm.free()
