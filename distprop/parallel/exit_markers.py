"""Which ranks of a job returned from their program, for `distprop launch`.

An MPI launcher's exit status does not always say that a rank was killed: Open MPI
5's mpiexec exits 0 when a host's processes, its daemon among them, are killed with
SIGKILL. So `distprop launch` names a directory in $DISTPROP_EXIT_MARKERS; each rank
writes `started-RANK` there when it starts the job (distprop.init) and `ended-RANK`
when its interpreter exits normally (a return, sys.exit, an exception that the
abort hook turns into MPI_Abort does not get that far). A rank that started but
never ended was killed. Ranks that cannot reach the directory (another host without
a shared file system; the variable is not passed to other hosts' daemons) write
nothing and are not judged.
"""

from __future__ import annotations

import atexit
import os

VARIABLE = "DISTPROP_EXIT_MARKERS"


def register(rank: int) -> None:
    # Taken out of the environment: processes this rank starts are not its ranks.
    directory = os.environ.pop(VARIABLE, None)
    if not directory or not _write(directory, f"started-{rank}"):
        return
    pid = os.getpid()
    # A forked child (a data worker) inherits atexit handlers; only this process ends the rank.
    atexit.register(lambda: os.getpid() == pid and _write(directory, f"ended-{rank}"))


def unfinished(directory: str) -> list[int]:
    """Ranks that wrote a start marker in `directory` and no end marker, in order."""
    try:
        names = set(os.listdir(directory))
    except OSError:
        return []
    started = {int(name.split("-", 1)[1]) for name in names if name.startswith("started-")}
    return sorted(rank for rank in started if f"ended-{rank}" not in names)


def _write(directory: str, name: str) -> bool:
    try:
        with open(os.path.join(directory, name), "w") as file:
            file.write(f"{os.getpid()}\n")
    except OSError:
        return False
    return True
