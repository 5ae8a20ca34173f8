"""Jobs spread over two hosts (network namespaces on this machine, MPI over TCP):
two ranks per host, so gradients go through each host's shared memory and then
between the hosts."""

import pytest

from distprop.launcher import find_mpiexec, is_open_mpi
from multihost import VirtualHosts
from mpi_launch import PROGRAMS


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if not VirtualHosts.available() or find_mpiexec() is None or not is_open_mpi(find_mpiexec()):
        pytest.skip("needs root, iproute2 and Open MPI")
    try:
        with VirtualHosts(2, tmp_path_factory.mktemp("hosts")) as virtual:
            yield virtual
    except Exception as error:  # namespaces refused (e.g. an unprivileged container)
        pytest.skip(f"cannot create network namespaces: {error}")


def test_data_parallel_suite_on_two_hosts(hosts):
    result = hosts.mpirun(2, ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", "--color=no",
                              "tests/test_parallel_mpi.py", "tests/test_data_mpi.py"],
                          timeout=600, DISTPROP_WATCHDOG_TIMEOUT=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(" passed") == 4 and " failed" not in result.stdout


def test_an_exception_on_one_host_ends_the_job_on_both(hosts):
    result = hosts.mpirun(2, [str(PROGRAMS / "rank_raises.py")], timeout=120)
    assert result.returncode != 0
    assert "rank 1 of 4: uncaught exception" in result.stderr
