"""Starting real MPI jobs from tests, each with a hard timeout."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = Path(__file__).parent / "mpi_programs"


@functools.lru_cache(maxsize=None)
def mpiexec() -> str | None:
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def is_open_mpi() -> bool:
    out = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=30)
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def mpiexec_command(ranks: int) -> list[str]:
    command = [mpiexec(), "-n", str(ranks)]
    if is_open_mpi():
        command[1:1] = ["--oversubscribe"]
    return command


def job_environment(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(ranks: int, args: list[str], timeout: float, **env):
    """Run `python args...` on `ranks` ranks; returns (CompletedProcess, seconds).
    A job still running at `timeout` is killed and the test fails."""
    start = time.monotonic()
    result = subprocess.run(mpiexec_command(ranks) + [sys.executable, *args], capture_output=True,
                            text=True, timeout=timeout, env=job_environment(**env))
    return result, time.monotonic() - start


def run_program(ranks: int, name: str, *args, timeout: float, **env):
    return run_job(ranks, [str(PROGRAMS / name), *map(str, args)], timeout, **env)
