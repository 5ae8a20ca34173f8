"""Several hosts on one machine, for tests of what crosses a network.

Each host is a network namespace with its own address on a private /24, joined
through a veth pair to a bridge in the root namespace. Open MPI starts its daemons
there through an "ssh agent" script that enters the host's namespace and gives it
a hostname of its own (with one shared hostname the runtime would take all hosts
for one node). Needs root and iproute2; everything is removed afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from distprop.launcher import find_mpiexec, job_environment


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class VirtualHosts:
    def __init__(self, count: int, workdir: Path):
        self.tag = secrets.token_hex(3)
        self.subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
        self.bridge = f"dpbr{self.tag}"
        self.addresses = [f"{self.subnet}.{11 + i}" for i in range(count)]
        self.namespaces = [f"dp{self.tag}h{i}" for i in range(count)]
        self.veths = [f"dp{self.tag}v{i}" for i in range(count)]
        self.workdir = workdir
        self.agent = workdir / "agent.sh"
        self.hostfile = workdir / "hosts"

    @staticmethod
    def available() -> bool:
        return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None \
            and shutil.which("unshare") is not None

    def __enter__(self):
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for address, namespace, veth in zip(self.addresses, self.namespaces, self.veths):
                _ip("netns", "add", namespace)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("netns", "exec", namespace, "ip", "link", "set", "eth0", "up")
                _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        cases = "\n".join(f'  {a}) ns={n} ;;' for a, n in zip(self.addresses, self.namespaces))
        self.agent.write_text(
            "#!/bin/sh\n# plm_ssh_agent: $1 is the host, the rest the command to run there\n"
            f'host="$1"; shift\ncase "$host" in\n{cases}\n  *) echo "unknown host $host" >&2; exit 1 ;;\nesac\n'
            # dashes, not dots: a dotted name would be cut at its first dot to one node name
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname host-$(echo $host | tr . -); $*"\n')
        self.agent.chmod(0o755)
        return self

    def __exit__(self, *exc) -> None:
        for namespace in self.namespaces:
            # Processes outlive their namespace's deletion: end what a timed-out job left.
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
            for pid in pids.stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        for veth in self.veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def mpirun(self, ranks_per_host: int, args: list[str], timeout: float, **env):
        """`python args...` with `ranks_per_host` ranks on each virtual host, over TCP."""
        self.hostfile.write_text("".join(f"{a} slots={ranks_per_host}\n" for a in self.addresses))
        network = f"{self.subnet}.0/24"
        variables = job_environment(PYTHONUNBUFFERED=1, **env)
        command = [find_mpiexec(), "--hostfile", str(self.hostfile), "-n", str(ranks_per_host * len(self.addresses)),
                   "--prtemca", "plm_ssh_agent", str(self.agent), "--prtemca", "plm_ssh_no_tree_spawn", "1",
                   "--prtemca", "oob_tcp_if_include", network, "--mca", "btl", "tcp,self",
                   "--mca", "btl_tcp_if_include", network, "--wdir", os.getcwd()]
        for name in ("PATH", "PYTHONPATH", "DISTPROP_WATCHDOG_TIMEOUT", *env):
            if name in variables:
                command += ["-x", name]
        return subprocess.run(command + [sys.executable, *args], capture_output=True, text=True,
                              timeout=timeout, env=variables)
