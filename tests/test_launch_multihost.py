"""`distprop launch --hostfile` across virtual hosts (network namespaces on this
machine, MPI over TCP), and the helper that makes them: N hosts, links shaped to a
fabric's bandwidth, nothing left behind. Skips only where the machine will not let
us make namespaces."""

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distprop.launcher import find_mpiexec, is_open_mpi
from mpi_launch import NO_MPIEXEC
import multihost
from multihost import VirtualHosts

pytestmark = pytest.mark.slow
REFUSED = ("Operation not permitted", "Permission denied")


@contextlib.contextmanager
def virtual_hosts(count, workdir, rate=None):
    """VirtualHosts for the block, or a skip where the kernel refuses namespaces."""
    if not VirtualHosts.available():
        pytest.skip("privileges: virtual hosts need root, iproute2 (ip, tc) and unshare")
    workdir.mkdir(parents=True, exist_ok=True)
    hosts = VirtualHosts(count, workdir, rate)
    try:
        hosts.__enter__()
    except subprocess.CalledProcessError as error:
        if any(text in (error.stderr or "") for text in REFUSED):
            pytest.skip(f"privileges: network namespaces refused: {error.stderr.strip()}")
        raise
    try:
        yield hosts
    finally:
        hosts.__exit__(None, None, None)


@pytest.fixture
def open_mpi():
    mpiexec = find_mpiexec()
    assert mpiexec is not None, NO_MPIEXEC
    if not is_open_mpi(mpiexec):
        pytest.skip("platform: virtual hosts start their daemons through Open MPI's ssh agent; this is MPICH")


def _ours(tag: str) -> str:
    """Every namespace and link on the machine whose name has `tag`."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    return " ".join(line for line in (namespaces + links).splitlines() if tag in line)


def test_check_passes_on_two_hosts(tmp_path, open_mpi):
    with virtual_hosts(2, tmp_path) as hosts:
        result = hosts.launch(["--check"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "distprop launch --check: 2 rank(s) on 2 host(s)"
    for rank, address in enumerate(hosts.addresses):
        assert lines[1 + rank].startswith(f"  rank {rank}/2  host host-{address.replace('.', '-')}  local rank 0/1")
    assert lines[-1] == "check passed"
    assert f"--hostfile {hosts.hostfile}" in result.stderr  # Open MPI's own syntax: handed over unchanged


def test_three_hosts_on_a_shaped_fabric(tmp_path, open_mpi):
    with virtual_hosts(3, tmp_path, rate="1gbit") as hosts:
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", hosts.veths[2]], capture_output=True, text=True,
                                timeout=30).stdout
        inside = subprocess.run(["ip", "netns", "exec", hosts.namespaces[2], "tc", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True, timeout=30).stdout
        program = ("import socket, distprop as dp; comm = dp.init(); "
                   "print(comm.rank, comm.allreduce(comm.rank + 1), socket.gethostname())")
        result = hosts.launch(["-n", "3", "--", sys.executable, "-c", program], timeout=300)
    assert "tbf" in qdiscs and "rate 1Gbit" in qdiscs and "rate 1Gbit" in inside
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == [f"{r} 6 host-{a.replace('.', '-')}"
                                                  for r, a in enumerate(hosts.addresses)]


def test_nothing_is_left_when_the_block_fails(tmp_path):
    with virtual_hosts(1, tmp_path / "probe"):  # skips where namespaces are refused
        pass
    with pytest.raises(RuntimeError, match="job failed"):
        with VirtualHosts(2, tmp_path) as hosts:
            assert hosts.tag in _ours(hosts.tag)
            raise RuntimeError("job failed")
    assert _ours(hosts.tag) == ""


def test_nothing_is_left_when_setting_up_fails(tmp_path, monkeypatch):
    with virtual_hosts(1, tmp_path / "probe"):
        pass
    real_ip = multihost._ip

    def second_host_refused(*args):
        if args[:2] == ("netns", "add") and args[2].endswith("h1"):
            raise subprocess.CalledProcessError(2, ["ip", *args], stderr="refused for the test")
        real_ip(*args)

    monkeypatch.setattr(multihost, "_ip", second_host_refused)
    hosts = VirtualHosts(2, tmp_path, rate="1gbit")
    with pytest.raises(subprocess.CalledProcessError):
        hosts.__enter__()
    assert _ours(hosts.tag) == ""
    with pytest.raises(ValueError, match="rate 'fast': expected e.g. '1gbit'"):
        VirtualHosts(2, tmp_path, rate="fast")


def test_a_killed_runs_hosts_are_removed_by_the_next(tmp_path):
    tests = Path(__file__).parent
    program = (f"import os, signal, sys; sys.path.insert(0, {str(tests)!r}); from pathlib import Path; "
               f"from multihost import VirtualHosts; h = VirtualHosts(2, Path({str(tmp_path)!r})).__enter__(); "
               "print(h.tag, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    with virtual_hosts(1, tmp_path / "probe"):
        killed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tag = killed.stdout.strip()
    assert tag and tag in _ours(tag)
    with virtual_hosts(1, tmp_path / "next"):
        assert _ours(tag) == ""
