"""The program every rank runs for `distprop launch --check`: what each rank sees
(host, ranks, device, threads, MPI library, CUDA-aware MPI, NCCL), one allreduce
and one broadcast verified, and the allreduce bus bandwidth of distprop beside a
raw mpi4py `Allreduce` of the same buffer, measured in turns in the same run.

Every verdict is agreed by all ranks before any of them reports or exits, so a
failure on one rank fails the check everywhere instead of leaving others waiting.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time

import numpy as np

SIZES = (8 * 2**20, 64 * 2**20)  # bytes: a mid-size gradient bucket, and a whole model's gradients
ITERATIONS = 20
WARMUP = 3
VERIFY_ELEMENTS = 2**20  # float64: every partial sum is an exact integer
# The job's size as the launcher that started this process gives it to its ranks
# (Open MPI; MPICH's Hydra, Intel MPI, Cray PALS and PMI-2 srun; LSF's jsrun).
LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JSM_NAMESPACE_SIZE")


def mpi_library() -> str:
    from mpi4py import MPI

    first = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
    return " ".join(first.replace("Version:", "").split())  # "Open MPI v5.0.11", "MPICH 5.0.2"


def cuda_aware() -> str:
    """Whether the MPI library can take GPU buffers, asked of the library itself
    (Open MPI's MPIX_Query_cuda_support, MPICH's MPIX_GPU_query_support)."""
    import mpi4py.MPI  # noqa: F401  (loads libmpi into this process)

    try:
        paths = {line.split()[-1] for line in open("/proc/self/maps") if "/libmpi" in line}
    except OSError:
        return "unknown"
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "MPIX_GPU_query_support"):
            supported = ctypes.c_int(0)
            if lib.MPIX_GPU_query_support(0, ctypes.byref(supported)) == 0:  # 0: MPIX_GPU_SUPPORT_CUDA
                return "yes" if supported.value else "no"
        if hasattr(lib, "MPIX_Query_cuda_support"):
            return "yes" if lib.MPIX_Query_cuda_support() else "no"
    return "unknown"


def size_mismatch(comm, environ) -> str | None:
    """Why MPI's world is not the one the launcher started, or None. Where mpi4py
    loads another MPI library than the launcher's, every process runs alone as
    "rank 0 of 1": the job looks fine and trains N separate models."""
    name = next((name for name in LAUNCHER_SIZES if environ.get(name, "").isdigit()), None)
    if name is None or int(environ[name]) == comm.size:  # one launcher started us: its variable comes first
        return None
    return (f"MPI gives {comm.size} rank(s) where the launcher started {environ[name]} ({name}={environ[name]}): "
            f"mpi4py loads {mpi_library()}, not the MPI whose mpiexec started it; use that MPI's "
            "mpiexec or build mpi4py against it (launch/README.md)")


def describe(comm, device: str) -> str:
    import distprop as dp
    from distprop import backend

    where = f"gpu {backend.current_gpu_id()}" if device == "gpu" else "cpu"
    return (f"rank {comm.rank}/{comm.size}  host {socket.gethostname()}  local rank {comm.local_rank}/"
            f"{comm.local_size}  {where}  threads {dp.get_num_threads()}  {mpi_library()}  "
            f"CUDA-aware MPI: {cuda_aware()}  NCCL: {'yes' if backend.nccl_module() else 'no'}")


def verify(comm, xp) -> tuple[bool, bool]:
    """(allreduce right, broadcast right) on this rank, for buffers of array module xp."""
    values = xp.arange(VERIFY_ELEMENTS, dtype=np.float64)
    summed = values * (comm.rank + 1)
    comm.allreduce_(summed, "sum")
    allreduce_ok = bool((summed == values * (comm.size * (comm.size + 1) // 2)).all())
    sent = values + 0.5 if comm.rank == 0 else xp.zeros_like(values)
    comm.bcast_(sent, root=0)
    return allreduce_ok, bool((sent == values + 0.5).all())


def _seconds(comm, function) -> float:
    """One call's time, as the slowest rank saw it; the ranks start it together."""
    comm.barrier()
    start = time.perf_counter()
    function()
    return comm.allreduce(time.perf_counter() - start, "max")


def bandwidth(comm, nbytes: int, xp, raw: bool) -> tuple[float | None, float, float | None]:
    """One allreduce of `nbytes` float32, distprop's and (with `raw`) mpi4py's:
    (raw median seconds or None, distprop's median seconds, median of raw/distprop
    over the pairs or None). The two take turns, each first every other time, and
    each pair is compared within itself: a busy neighbour slows both of a pair alike."""
    from distprop import backend

    buffer = xp.zeros(nbytes // 4, dtype=np.float32)  # zeros: repeated sums never overflow

    def ours():
        comm.allreduce_(buffer, "sum")
        backend.synchronize()

    def mpi4py_allreduce():
        comm.mpi_comm.Allreduce(comm.MPI.IN_PLACE, buffer)

    times = {ours: [], mpi4py_allreduce: []}
    for i in range(WARMUP + ITERATIONS):
        order = (mpi4py_allreduce, ours) if i % 2 == 0 else (ours, mpi4py_allreduce)
        for function in order if raw else (ours,):
            times[function].append(_seconds(comm, function))
    ours_s = float(np.median(times[ours][WARMUP:]))
    if not raw:
        return None, ours_s, None
    raw_s = np.array(times[mpi4py_allreduce][WARMUP:])
    return float(np.median(raw_s)), ours_s, float(np.median(raw_s / np.array(times[ours][WARMUP:])))


def _gbps(nbytes: int, seconds: float | None, factor: float) -> str:
    return "-" if seconds is None else f"{nbytes / seconds / 1e9 * factor:.2f}"


def main() -> int:
    import distprop as dp
    from distprop import backend

    comm = dp.init()

    def say(text: str) -> None:  # rank 0 reports for all
        if comm.rank == 0:
            print(text, flush=True)

    device = "gpu" if comm.allreduce(int(backend.gpu_available()), "min") else "cpu"  # init's own rule
    lines = comm.allgather_object(describe(comm, device))
    hosts = set(comm.allgather_object(socket.gethostname()))
    say(f"distprop launch --check: {comm.size} rank(s) on {len(hosts)} host(s)")
    for line in lines:
        say(f"  {line}")

    buffers = [("host", np)] + ([("gpu", backend.cupy_module())] if device == "gpu" else [])
    failures = sorted({m for m in comm.allgather_object(size_mismatch(comm, os.environ)) if m})
    for kind, xp in buffers:
        verdicts = comm.allgather_object(verify(comm, xp))  # every rank sees every verdict
        for which, name in enumerate(("allreduce", "broadcast")):
            wrong = [rank for rank, oks in enumerate(verdicts) if not oks[which]]
            if wrong:
                failures.append(f"{name} of {kind} buffers wrong on rank(s) {wrong}")
        say(f"allreduce and broadcast of {VERIFY_ELEMENTS} float64 ({kind} buffers): "
            f"{'ok' if all(all(oks) for oks in verdicts) else 'WRONG'}")

    if comm.size == 1 and not failures:
        say("allreduce bus bandwidth: needs 2 ranks or more")
    elif not failures:  # nothing measured on a job that is not the one started, or computes wrong sums
        factor = 2 * (comm.size - 1) / comm.size  # bus bandwidth, as nccl-tests defines it for allreduce
        say(f"allreduce bus bandwidth, float32, medians of {ITERATIONS} calls (slowest rank's time); "
            "distprop/mpi4py over calls made in pairs:")
        say(f"  {'size':>7} {'buffers':>8} {'mpi4py GB/s':>12} {'distprop GB/s':>14} {'distprop/mpi4py':>16}")
        for nbytes in SIZES:
            for kind, xp in buffers:
                raw, ours, paired = bandwidth(comm, nbytes, xp, raw=kind == "host")
                ratio = "-" if paired is None else f"{paired:.2f}"
                say(f"  {nbytes // 2**20:>4} MB {kind:>8} {_gbps(nbytes, raw, factor):>12} "
                    f"{_gbps(nbytes, ours, factor):>14} {ratio:>16}")
    say("check failed: " + "; ".join(failures) if failures else "check passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
