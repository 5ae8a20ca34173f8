"""Jobs spread over two hosts (network namespaces on this machine, MPI over TCP):
two ranks per host, so gradients go through each host's shared memory and then
between the hosts.

Skips only where the machine will not let us make namespaces (not root, or the
kernel refuses); any other setup error fails."""

import subprocess
from pathlib import Path

import pytest

from distprop.launcher import find_mpiexec, is_open_mpi
from mpi_launch import NO_MPIEXEC, PROGRAMS
from multihost import VirtualHosts

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
REFUSED = ("Operation not permitted", "Permission denied")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if not VirtualHosts.available():
        pytest.skip("privileges: virtual hosts need root, iproute2 (ip, tc) and unshare")
    mpiexec = find_mpiexec()
    assert mpiexec is not None, NO_MPIEXEC
    assert is_open_mpi(mpiexec), f"{mpiexec} is not Open MPI's: the virtual hosts are started through its ssh agent"
    try:
        virtual = VirtualHosts(2, tmp_path_factory.mktemp("hosts")).__enter__()
    except subprocess.CalledProcessError as error:
        if any(text in (error.stderr or "") for text in REFUSED):  # e.g. an unprivileged container
            pytest.skip(f"privileges: network namespaces refused: {error.stderr.strip()}")
        raise
    try:
        yield virtual
    finally:
        virtual.__exit__(None, None, None)


def test_data_parallel_suite_on_two_hosts(hosts):
    files = [str(TESTS / "test_parallel_mpi.py"), str(TESTS / "test_data_mpi.py")]
    result = hosts.mpirun(2, ["-m", "pytest", "--with-mpi", "-m", "mpi", "-q", "-p", "no:cacheprovider", "--color=no",
                              *files], timeout=600, DISTPROP_WATCHDOG_TIMEOUT=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(" passed") == 4 and " failed" not in result.stdout


def test_an_exception_on_one_host_ends_the_job_on_both(hosts):
    result = hosts.mpirun(2, [str(PROGRAMS / "rank_raises.py")], timeout=120)
    assert result.returncode != 0
    assert "rank 1 of 4: uncaught exception" in result.stderr
