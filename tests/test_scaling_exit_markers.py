"""A job whose ranks were killed ends `distprop launch` with a non-zero status even
where the MPI launcher exits 0 (Open MPI 5 after a host's processes are killed):
ranks started through distprop.init mark their start and their normal exit.
The launcher's side against a stand-in mpiexec that exits 0 whatever happened,
the ranks' side in real jobs; tests/test_scaling_hosts.py kills a real host."""

import os
import signal
import subprocess
import sys

import pytest

from distprop.parallel import exit_markers
from mpi_launch import NO_MPIEXEC, mpiexec


def launch(*args, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "distprop", "launch", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env.items()}})


@pytest.fixture
def stand_in(tmp_path):
    """An "Open MPI" mpiexec that writes the markers $MARKS names and exits 0."""
    script = tmp_path / "mpiexec"
    script.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "mpiexec (Open MPI) 5.0.5"; exit 0; fi\n'
                      'for mark in $MARKS; do echo 0 > "$DISTPROP_EXIT_MARKERS/$mark"; done\nexit 0\n')
    script.chmod(0o755)
    return script


def test_a_rank_that_started_and_never_ended_fails_the_launch(stand_in):
    result = launch("--mpiexec", stand_in, "-n", 3, "--", "true",
                    MARKS="started-0 ended-0 started-1 started-2 ended-2")
    assert result.returncode == 1, result.stderr
    assert "rank(s) 1 started but never returned from the program (killed?)" in result.stderr
    assert "exited with status 0" in result.stderr


@pytest.mark.parametrize("marks", ["started-0 ended-0 started-1 ended-1", ""])
def test_ranks_that_ended_or_were_never_seen_leave_the_status_alone(stand_in, marks):
    """No markers: a program that does not start distprop, or ranks on hosts that
    cannot reach the directory -- nothing to judge by."""
    result = launch("--mpiexec", stand_in, "-n", 2, "--", "true", MARKS=marks)
    assert result.returncode == 0, result.stderr


def test_unfinished_reads_only_start_markers_without_their_end(tmp_path):
    for name in ("started-0", "ended-0", "started-10", "started-2", "ended-3", "unrelated"):
        (tmp_path / name).write_text("1\n")
    assert exit_markers.unfinished(str(tmp_path)) == [2, 10]
    assert exit_markers.unfinished(str(tmp_path / "absent")) == []


def _rank_program(tmp_path, body):
    program = tmp_path / "rank.py"
    program.write_text("import os, signal, sys\nimport distprop as dp\ncomm = dp.init(threads=1)\n" + body)
    return program


@pytest.fixture
def real_mpiexec():
    if mpiexec() is None:
        pytest.fail(NO_MPIEXEC)


def test_a_rank_marks_its_start_and_its_end_and_hides_the_directory_from_its_children(real_mpiexec, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    program = _rank_program(tmp_path, "assert 'DISTPROP_EXIT_MARKERS' not in os.environ\n"
                                      "print(sorted(os.listdir(sys.argv[1])))\n")
    result = subprocess.run([sys.executable, program, markers], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DISTPROP_EXIT_MARKERS": str(markers)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['started-0']"  # while it runs
    assert sorted(os.listdir(markers)) == ["ended-0", "started-0"]
    assert launch("-n", 2, "--", sys.executable, program, markers).returncode == 0


def test_a_real_job_with_a_killed_rank_ends_non_zero(real_mpiexec, tmp_path):
    program = _rank_program(tmp_path, "comm.barrier()\nif comm.rank == 1:\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                                      "comm.barrier()\n")
    result = launch("-n", 2, "--", sys.executable, program, DISTPROP_WATCHDOG_TIMEOUT=20)
    assert result.returncode != 0, result.stderr[-3000:]
