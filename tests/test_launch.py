"""`distprop launch` starting real jobs on this machine, under whichever MPI is
installed (CI runs this file under Open MPI and again under MPICH). Every job has a
hard timeout."""

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpi_launch import NO_MPIEXEC, PROGRAMS, mpiexec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(mpiexec() is None, reason=NO_MPIEXEC)]

# Each rank leaves a file named after its rank holding its pid, then exits with the
# status it is given (after sleeping, if asked: for the tests that kill the launcher).
RANK_PROGRAM = """
import os, sys, time
from pathlib import Path
import distprop as dp
comm = dp.init()
Path(sys.argv[1], f"rank{comm.rank}").write_text(str(os.getpid()))
comm.barrier()
time.sleep(float(sys.argv[3]))
sys.exit(int(sys.argv[2]))
"""


def launch_command(*args):
    return [sys.executable, "-m", "distprop", "launch", *args]


def distprop_launch(*args, timeout=120, env=None):
    return subprocess.run(launch_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def ranks_program(tmp_path, status=0, sleep=0.0):
    return ["--", sys.executable, "-c", RANK_PROGRAM, str(tmp_path), str(status), str(sleep)]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_runs_a_program_on_n_ranks(tmp_path, ranks):
    result = distprop_launch("-n", str(ranks), *ranks_program(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank{r}" for r in range(ranks)]
    assert "distprop launch: " in result.stderr and " -n " + str(ranks) in result.stderr  # the command it ran


def test_returns_the_jobs_exit_status(tmp_path):
    result = distprop_launch("-n", "2", *ranks_program(tmp_path, status=3))
    assert result.returncode == 3, result.stderr


def test_a_failing_rank_fails_the_job():
    result = distprop_launch("-n", "2", "--", sys.executable, str(PROGRAMS / "rank_raises.py"))
    assert result.returncode != 0
    assert "rank 1 of 2: uncaught exception" in result.stderr


def test_env_reaches_every_rank():
    program = "import os; print(os.environ['GREETING'] + '|' + os.environ['LAUNCH_TEST_INHERITED'])"
    result = distprop_launch("-n", "2", "--env", "GREETING=hello, world; 'quoted'", "--env", "LAUNCH_TEST_INHERITED",
                             "--", sys.executable, "-c", program, env={"LAUNCH_TEST_INHERITED": "from the shell"})
    assert result.returncode == 0, result.stderr
    # Two ranks' lines can reach the launcher's stdout interleaved (MPICH forwards
    # each rank's output in chunks): count them rather than split lines.
    expected = "hello, world; 'quoted'|from the shell"
    assert result.stdout.count(expected) == 2 and not result.stdout.replace(expected, "").strip(), result.stdout


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _start_sleeping_job(tmp_path, ranks=2):
    """The launcher with `ranks` ranks that sleep; returns it and every process of the
    job (mpiexec, its helpers, the ranks) once all ranks are up."""
    launcher = subprocess.Popen(launch_command("-n", str(ranks), *ranks_program(tmp_path, sleep=300)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)  # a process group of its own, as a terminal gives it
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("rank*"))) < ranks:
        assert launcher.poll() is None, launcher.stderr.read()
        assert time.monotonic() < deadline, "the ranks did not start within 90 s"
        time.sleep(0.2)
    time.sleep(0.5)  # the last rank has written its file: let every process reach the barrier
    return launcher, _descendants(launcher.pid)


def _left_running(pids, seconds=30.0):
    deadline = time.monotonic() + seconds
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _running(p)]


def _end(pids):
    for pid in pids:  # only processes this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="platform: the parent-death signal is Linux's")
def test_sigkill_of_the_launcher_leaves_nothing_running(tmp_path):
    launcher, job = _start_sleeping_job(tmp_path)
    ranks = [int(p.read_text()) for p in tmp_path.glob("rank*")]
    assert set(ranks) <= set(job) and len(job) > len(ranks)  # mpiexec and the ranks below it
    try:
        launcher.kill()
        launcher.wait(timeout=30)
        left = _left_running(job)
        assert not left, f"still running 30 s after the launcher was killed: {left}"
    finally:
        _end(job)


@pytest.mark.parametrize("signum, to", [(signal.SIGINT, "terminal"), (signal.SIGINT, "launcher"),
                                        (signal.SIGTERM, "launcher")])
def test_a_signal_to_the_launcher_ends_every_rank(tmp_path, signum, to):
    launcher, job = _start_sleeping_job(tmp_path)
    try:
        if to == "terminal":  # Ctrl-C: the terminal signals its whole foreground process group
            os.killpg(launcher.pid, signum)
        else:  # the launcher alone, as `kill` or a scheduler would
            launcher.send_signal(signum)
        assert launcher.wait(timeout=60) == 128 + signum, launcher.stderr.read()  # 130 for Ctrl-C, as a shell says
        assert not _left_running(job), "ranks still running after the launcher ended"
    finally:
        _end(job)


def test_check_on_two_ranks():
    result = distprop_launch("--check", "-n", "2", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "distprop launch --check: 2 rank(s) on 1 host(s)"
    for rank in (0, 1):
        line = lines[1 + rank]
        assert line.startswith(f"  rank {rank}/2  host ") and f"local rank {rank}/2" in line
        assert "CUDA-aware MPI: " in line and "NCCL: " in line and ("Open MPI" in line or "MPICH" in line)
    assert "allreduce and broadcast of 1048576 float64 (host buffers): ok" in lines
    rows = [line.split() for line in lines if line.strip().startswith(("8 MB", "64 MB"))]
    assert [row[:3] for row in rows] == [["8", "MB", "host"], ["64", "MB", "host"]]
    assert all(float(value) > 0 for row in rows for value in row[3:])
    assert lines[-1] == "check passed"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="platform: no CPU affinity to read")
def test_bind_core_gives_each_rank_cores_of_its_own():
    from distprop.launcher.node import physical_cores

    ranks = min(2, physical_cores())
    program = "import os; print(sorted(os.sched_getaffinity(0)))"
    bound = distprop_launch("-n", str(ranks), "--bind", "core", "--", sys.executable, "-c", program)
    assert bound.returncode == 0, bound.stderr
    sets = affinities(bound.stdout)
    assert len(sets) == ranks and all(sets)
    assert len(set.union(*sets)) == sum(map(len, sets))  # no CPU shared between ranks
    unbound = distprop_launch("-n", str(ranks), "--bind", "none", "--", sys.executable, "-c", program)
    assert affinities(unbound.stdout) == [os.sched_getaffinity(0)] * ranks


def affinities(stdout: str) -> list[set]:
    """The CPU sets the ranks printed, whatever the interleaving of their lines."""
    return [set(ast.literal_eval(printed)) for printed in re.findall(r"\[[\d, ]*\]", stdout)]
