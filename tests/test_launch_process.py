"""How `distprop launch` runs its command (distprop/launcher/process.py), with a plain
Python child in place of mpiexec: exit statuses, signals passed on, what status a
signal that ended the job gives. The MPI jobs are in test_launch.py."""

import os
import signal
import sys
import threading

import pytest

from distprop.launcher import process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="platform: the launcher stays the parent only where Linux's "
                                       "parent-death signal guards its child")

# Says it is up, then sleeps; on SIGTERM it exits with the status it is given, or
# (given "die") lets SIGTERM end it.
CHILD = """
import signal, sys, time
if sys.argv[1] != "die":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(sys.argv[1])))
open(sys.argv[2], "w").close()
time.sleep(60)
"""


def run_and_signal(tmp_path, on_sigterm: str, signum=signal.SIGTERM, failed_anyway=lambda: False) -> int:
    """process.run on the child, with `signum` sent to this process once the child is up."""
    up = tmp_path / "up"
    up.unlink(missing_ok=True)  # from an earlier call
    unguarded = signal.getsignal(signum)

    def signal_us_when_up():  # never before process.run passes the signal on: it would end pytest
        while not up.exists() or signal.getsignal(signum) is unguarded:
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signum)  # as `kill` would: to the launcher, not the child

    threading.Thread(target=signal_us_when_up, daemon=True).start()
    return process.run([sys.executable, "-c", CHILD, on_sigterm, str(up)], dict(os.environ), failed_anyway)


def test_the_commands_exit_status_is_returned():
    assert process.run([sys.executable, "-c", "raise SystemExit(7)"], dict(os.environ)) == 7
    assert process.run([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], dict(os.environ)) == 128 + 9


def test_a_signal_that_ends_the_job_gives_128_plus_its_number(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert run_and_signal(tmp_path, "die") == 128 + signal.SIGTERM
    # mpiexec reports an interrupted job as 1: the signal, not that 1, is the answer
    assert run_and_signal(tmp_path, "1") == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the forwarding handlers are gone again


def test_a_job_whose_launcher_says_0_but_whose_ranks_died_of_the_signal_gives_128_plus_it(tmp_path):
    """MPICH's mpiexec can exit 0 after passing Ctrl-C on to the ranks it then ended."""
    assert run_and_signal(tmp_path, "0", failed_anyway=lambda: True) == 128 + signal.SIGTERM


def test_a_job_that_ends_well_on_a_signal_keeps_its_status(tmp_path):
    assert run_and_signal(tmp_path, "0") == 0  # e.g. it saved a checkpoint and stopped cleanly
    assert run_and_signal(tmp_path, "die", signal.SIGUSR1) == 128 + signal.SIGUSR1  # a warning, not an ending
