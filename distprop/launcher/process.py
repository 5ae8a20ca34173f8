"""Running the launcher command (mpiexec or srun) so that nothing outlives us.

The command runs as our child. Signals sent to us (Ctrl-C, `kill`, a lost login's
SIGHUP, Slurm's warning signals) are passed on to it, and it ends every rank.
SIGKILL cannot be passed on: for that the child holds a parent-death signal
(Linux's PR_SET_PDEATHSIG), so the kernel sends it SIGTERM the moment we die and
it ends the ranks as for any SIGTERM. A plain mpiexec does not protect itself this
way: Open MPI 5's, killed with SIGKILL, leaves its ranks running (seen here; MPICH's
proxies do end theirs). Both take a signal that arrives twice (from the terminal
and from us) like one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # the rest may only warn the job
_PR_SET_PDEATHSIG = 1


def _death_signal_setter():
    """A function for the child (between fork and exec) that asks for SIGTERM when
    its parent dies, or None where the platform has no such thing."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before the request took: nobody will send it
            os._exit(1)

    return set_death_signal


def run(argv: list[str], env: dict[str, str], failed_anyway=lambda: False) -> int:
    """Run argv to its end; its exit status (128 + N for a death by signal N, as a
    shell says). A job that fails after we passed it Ctrl-C, SIGTERM, SIGHUP or
    SIGQUIT gives 128 + that signal (130 for Ctrl-C), as an interrupted command
    does, where mpiexec itself would say 1 whatever happened -- or 0: MPICH's
    mpiexec can exit 0 after passing Ctrl-C to ranks that it ended, which
    `failed_anyway()` (called once the command is over) tells."""
    setter = _death_signal_setter()
    if setter is None:  # no parent-death signal: become the command, so a kill reaches it directly
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(argv[0], argv, env)
    child = subprocess.Popen(argv, env=env, preexec_fn=setter)
    received = []

    def forward(number, _frame) -> None:
        received.append(number)
        child.send_signal(number)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended_by = next((sig for sig in received if sig in ENDING), None)
    if ended_by is not None and (code != 0 or failed_anyway()):
        return 128 + ended_by
    return 128 - code if code < 0 else code
