"""Several hosts on one machine, for tests of what crosses a network.

Each host is a network namespace with its own address on a private /24, joined
through a veth pair to a bridge in the root namespace; optionally every link is
shaped with `tc tbf` to a fabric's bandwidth (e.g. "1gbit", "10gbit"), in both
directions. Jobs start through `distprop launch --hostfile`: Open MPI starts its
daemons through an "ssh agent" script that enters the host's namespace and gives
it a hostname of its own (with one shared hostname the runtime would take all
hosts for one node). Needs root, iproute2 and Open MPI. Namespaces, links and
bridge are removed afterwards, also when setting up or the job fails, and what a
killed run left behind is removed by the next.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

# dp<creator pid, 6 hex><2 random hex>: the creator's pid tells the leftovers of a
# killed run (creator gone) from another live run's hosts.
_NAME = re.compile(r"^dp([0-9a-f]{6})[0-9a-f]{2}(h\d+|v\d+|br)$")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _quiet(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=30)


def _remove(namespaces, links) -> None:
    for namespace in namespaces:
        # Processes outlive their namespace's deletion: end what a timed-out job left.
        for pid in _quiet("ip", "netns", "pids", namespace).stdout.split():
            _quiet("kill", "-9", pid)
        _quiet("ip", "netns", "del", namespace)
    for link in links:  # a veth's peer goes with it; the bridge last
        _quiet("ip", "link", "del", link)


def _creator_alive(name: str) -> bool:
    try:
        os.kill(int(_NAME.match(name).group(1), 16), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers() -> None:
    """Namespaces and links of runs whose process is gone (a test killed by its timeout)."""
    namespaces = [line.split()[0] for line in _quiet("ip", "netns", "list").stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0] for line in _quiet("ip", "-o", "link").stdout.splitlines()]
    _remove([n for n in namespaces if _NAME.match(n) and not _creator_alive(n)],
            sorted((l for l in links if _NAME.match(l) and not _creator_alive(l)), key=lambda l: l.endswith("br")))


def _free_subnet() -> str:
    used = _quiet("ip", "-o", "-4", "addr").stdout
    while True:
        subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
        if f" {subnet}." not in used:
            return subnet


class VirtualHosts:
    def __init__(self, count: int, workdir: Path, rate: str | None = None):
        self.tag = f"dp{os.getpid():06x}{secrets.token_hex(1)}"
        self.count, self.rate = count, rate
        self.burst = f"{max(32, _bits(rate) // 250_000)}kbit" if rate else None  # checks the rate early
        self.bridge = f"{self.tag}br"
        self.namespaces = [f"{self.tag}h{i}" for i in range(count)]
        self.veths = [f"{self.tag}v{i}" for i in range(count)]
        self.workdir = workdir
        self.agent = workdir / "agent.sh"
        self.hostfile = workdir / "hosts"
        self.subnet = self.addresses = None

    @staticmethod
    def available() -> bool:
        return hasattr(os, "geteuid") and os.geteuid() == 0 and all(
            shutil.which(tool) for tool in ("ip", "unshare", "tc"))

    def __enter__(self):
        remove_leftovers()
        self.subnet = _free_subnet()
        self.addresses = [f"{self.subnet}.{11 + i}" for i in range(self.count)]
        try:
            self._write_agent()
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for address, namespace, veth in zip(self.addresses, self.namespaces, self.veths):
                _ip("netns", "add", namespace)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                _ip("link", "set", veth, "master", self.bridge, "up")
                inside = ("netns", "exec", namespace, "ip")
                _ip(*inside, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip(*inside, "link", "set", "eth0", "up")
                _ip(*inside, "link", "set", "lo", "up")
                if self.rate:
                    self._shape(namespace, veth)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _write_agent(self) -> None:
        cases = "\n".join(f'  {a}) ns={n} ;;' for a, n in zip(self.addresses, self.namespaces))
        self.agent.write_text(
            "#!/bin/sh\n# plm_ssh_agent: $1 is the host, the rest the command to run there\n"
            f'host="$1"; shift\ncase "$host" in\n{cases}\n  *) echo "unknown host $host" >&2; exit 1 ;;\nesac\n'
            # dashes, not dots: a dotted name would be cut at its first dot to one node name
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname host-$(echo $host | tr . -); $*"\n')
        self.agent.chmod(0o755)

    def _shape(self, namespace: str, veth: str) -> None:
        """Limit the link to `rate` both ways: what the host sends (its eth0) and what it
        receives (the bridge's side). tbf needs a bucket of at least one timer tick's
        worth of bytes, or it cannot reach the rate."""
        shaping = ("root", "tbf", "rate", self.rate, "burst", self.burst, "latency", "400ms")
        subprocess.run(["tc", "qdisc", "add", "dev", veth, *shaping], check=True, capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", "eth0", *shaping],
                       check=True, capture_output=True, timeout=30)

    def __exit__(self, *exc) -> None:
        _remove(self.namespaces, self.veths + [self.bridge])

    def environment(self, **extra) -> dict:
        """Open MPI's settings for these hosts, as variables `distprop launch` passes on:
        daemons started through the agent, all traffic over TCP on the hosts' subnet."""
        network = f"{self.subnet}.0/24"
        env = dict(os.environ, PYTHONUNBUFFERED="1", PRTE_MCA_plm_ssh_agent=str(self.agent),
                   PRTE_MCA_plm_ssh_no_tree_spawn="1", PRTE_MCA_oob_tcp_if_include=network,
                   OMPI_MCA_btl="tcp,self", OMPI_MCA_btl_tcp_if_include=network)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def launch(self, args: list[str], timeout: float, slots: int = 1, **env) -> subprocess.CompletedProcess:
        """`distprop launch --hostfile <these hosts, `slots` each> ARGS...`, e.g.
        ["--check"] or ["-n", "3", "--", sys.executable, "prog.py"]; `env` reaches every rank."""
        self.hostfile.write_text("".join(f"{a} slots={slots}\n" for a in self.addresses))
        forwarded = [a for name in env for a in ("--env", name)]
        command = [sys.executable, "-m", "distprop", "launch", "--hostfile", str(self.hostfile), *forwarded, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self.environment(**env))

    def mpirun(self, ranks_per_host: int, args: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
        """`python args...` with `ranks_per_host` ranks on each virtual host."""
        return self.launch(["-n", str(ranks_per_host * self.count), "--", sys.executable, *args], timeout,
                           slots=ranks_per_host, **env)


def _bits(rate: str) -> int:
    """tc's rate "10gbit" / "500mbit" / "100kbit" in bits per second."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not found:
        raise ValueError(f"rate {rate!r}: expected e.g. '1gbit', '10gbit' or '500mbit'")
    return int(float(found.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[found.group(2)])
