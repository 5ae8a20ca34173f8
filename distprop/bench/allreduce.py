"""`mpiexec -n N distprop bench allreduce`: allreduce bandwidth of distprop's
communicator against a raw mpi4py `Allreduce` of the same buffer, in the same run.

algbw = bytes / time; busbw = algbw * 2(n-1)/n, as nccl-tests defines it for
allreduce (comparable with the link bandwidth whatever the number of ranks).
"distprop mean" is what the reducer does to a bucket: a sum, then the division.
"""

from __future__ import annotations

import time

import numpy as np

from distprop.bench.timing import environment_note, median


def configure(parser) -> None:
    parser.add_argument("--min-bytes", type=int, default=4 * 1024)
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))


def _timed(comm, function, iterations: int) -> float:
    """Median seconds per call; ranks start each call together, and the slowest
    rank's time is the call's time."""
    samples = []
    for i in range(iterations + 3):
        comm.barrier()
        start = time.perf_counter()
        function()
        elapsed = comm.allreduce(time.perf_counter() - start, "max")
        if i >= 3:
            samples.append(elapsed)
    return median(samples)


def _synchronized(function):
    from distprop import backend

    def call():
        function()
        backend.synchronize()  # no-op without a GPU

    return call


def _raw_allreduce(comm, buffer):
    """The reference: mpi4py's Allreduce on host buffers, NCCL's own call on GPU ones."""
    from distprop import backend

    if backend.is_gpu_array(buffer):
        nccl = getattr(comm, "nccl", None)
        if nccl is None:
            return lambda: None
        kind = nccl._nccl_dtype(buffer, "sum")
        return _synchronized(lambda: nccl.comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, kind,
                                                         nccl.nccl.NCCL_SUM, nccl.stream.ptr)
                             or nccl.stream.synchronize())
    mpi = getattr(comm, "mpi_comm", None)
    if mpi is None:
        return lambda: None
    from mpi4py import MPI

    return lambda: mpi.Allreduce(MPI.IN_PLACE, buffer)


def run(args) -> int:
    import distprop as dp
    from distprop import backend

    comm = dp.init(device=args.device)
    if comm.size == 1 and comm.rank == 0:
        print("note: a single rank; run under mpiexec -n N for a real measurement")
    dtype = np.dtype(args.dtype)
    xp = backend.cupy_module() if args.device == "gpu" else np
    if comm.rank == 0:
        print(environment_note())
        print(f"{comm.size} ranks, {dtype}, {args.device}; times are medians of {args.iterations} calls "
              f"(slowest rank)")
        print(f"{'bytes':>11} {'raw ms':>8} {'algbw GB/s':>10} {'busbw GB/s':>10} "
              f"{'distprop ms':>11} {'ratio':>6} {'mean ms':>8} {'ratio':>6}")
    factor = 2 * (comm.size - 1) / comm.size if comm.size > 1 else 1.0
    size = args.min_bytes
    while size <= args.max_bytes:
        buffer = xp.ones(size // dtype.itemsize, dtype)
        raw = _timed(comm, _raw_allreduce(comm, buffer), args.iterations)
        ours = _timed(comm, _synchronized(lambda: comm.allreduce_(buffer, "sum")), args.iterations)
        mean = _timed(comm, _synchronized(lambda: comm.allreduce_(buffer, "mean")), args.iterations)
        reference = raw
        if comm.rank == 0:
            algbw = size / reference / 1e9
            print(f"{size:11d} {raw * 1e3:8.3f} {algbw:10.2f} {algbw * factor:10.2f} "
                  f"{ours * 1e3:11.3f} {ours / reference:6.2f} {mean * 1e3:8.3f} {mean / reference:6.2f}")
        size *= 4
    return 0
