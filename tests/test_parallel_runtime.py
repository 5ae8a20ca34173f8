"""Starting a job: a plain process, and the share of cores each rank gets."""

import re
import subprocess
import sys

import pytest

from mpi_launch import NO_MPIEXEC, mpiexec, run_program


def test_plain_process_without_launcher_is_a_job_of_one():
    code = "import distprop; c = distprop.init(); print(c.rank, c.size, c.local_rank, c.local_size)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["0", "1", "0", "1"]


def _reports(stdout):
    pattern = r"rank (\d+) local_size (\d+) blas (\d+) allowed (\d+) cores (\d+)"
    return [tuple(map(int, m)) for m in re.findall(pattern, stdout)]


@pytest.mark.slow
@pytest.mark.skipif(mpiexec() is None, reason=NO_MPIEXEC)
def test_each_rank_gets_its_share_of_the_cores():
    result, _ = run_program(2, "thread_share.py", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    reports = _reports(result.stdout)
    assert len(reports) == 2
    for rank, local_size, blas, allowed, cores in reports:
        expected = allowed if allowed < cores else max(1, cores // local_size)
        assert blas == expected, (rank, local_size, blas, allowed, cores)


@pytest.mark.slow
@pytest.mark.skipif(mpiexec() is None, reason=NO_MPIEXEC)
def test_thread_counts_the_user_set_are_left_alone():
    # 2 threads each: more than the share init() would give 2 ranks on 2 cores, and
    # no more than OpenBLAS accepts on a 2-core machine.
    result, _ = run_program(2, "thread_share.py", timeout=60, OPENBLAS_NUM_THREADS=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [blas for _, _, blas, _, _ in _reports(result.stdout)] == [2, 2]
