"""Hosts and their slots: hostfiles in either MPI's syntax, `--hosts` lists, and the
hostfile each MPI reads.

One reading for both MPIs, so that a job means the same under either:
`node1 slots=4` (Open MPI) and `node1:4` (MPICH) give node1 four slots; a host
without a count has one slot per line it is listed on (as MPICH, PBS's and LSF's
node files read; Open MPI alone would count that host's cores instead).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from distprop.errors import UserError

_NAME = re.compile(r"^(?:[A-Za-z0-9_.\-]+|\[[0-9A-Za-z:.%]+\])$")  # names, IPv4 and bracketed IPv6 addresses


@dataclass
class Host:
    name: str
    slots: int
    where: str  # where it was listed, for messages: "hosts:3", "--hosts"
    syntax: str = "plain"  # how its count was written: "openmpi", "mpich" or "plain" (none)


def _count(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{where}: slot count {text!r} is not a positive integer")
    return int(text)


def _merge(hosts: list[Host]) -> list[Host]:
    """One entry per host, in first-listed order; a host listed twice has the slots of both lines."""
    merged: dict[str, Host] = {}
    for host in hosts:
        if host.name in merged:
            first = merged[host.name]
            merged[host.name] = Host(first.name, first.slots + host.slots, first.where, "repeated")
        else:
            merged[host.name] = host
    return list(merged.values())


def _parse_entry(text: str, where: str) -> Host:
    tokens = text.split()
    name, count, syntax = tokens[0], 1, "plain"
    # MPICH's host:N; an IPv6 address is bracketed ([::1] or [::1]:N) so that its
    # own colons are not read as a count.
    if ":" in name.rpartition("]")[2]:
        name, _, number = name.rpartition(":")
        count, syntax = _count(number, where), "mpich"
    for token in tokens[1:]:
        key, equals, value = token.partition("=")
        if not equals or key not in ("slots", "max_slots", "max-slots") or syntax == "mpich":
            raise UserError(f"{where}: cannot read {text!r} (expected 'host', 'host slots=N' or 'host:N')")
        if key == "slots":
            count, syntax = _count(value, where), "openmpi"
        else:
            _count(value, where)  # a cap Open MPI applies when oversubscribing; checked, not used
    if not name or not _NAME.match(name):
        raise UserError(f"{where}: {name!r} is not a host name")
    return Host(name, count, where, syntax)


def parse_hostfile(path: str) -> list[Host]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"hostfile {path} does not exist" if not file.exists() else f"hostfile {path} is not a file")
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"hostfile {path}: cannot read it ({error})") from None
    hosts = [_parse_entry(line.split("#", 1)[0].strip(), f"hostfile {path}:{number}")
             for number, line in enumerate(lines, 1) if line.split("#", 1)[0].strip()]
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts")
    return _merge(hosts)


def parse_host_list(text: str) -> list[Host]:
    """`--hosts a:4,b:4,c` (a host without a count has one slot)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise UserError(f"--hosts {text!r}: expected a comma-separated list like node1:4,node2:4")
    return _merge([_parse_entry(item, f"--hosts {item!r}") for item in items])


def host_list(hosts: list[Host]) -> str:
    """The `--host`/`-hosts` argument both MPIs read as these hosts and slots."""
    return ",".join(f"{h.name}:{h.slots}" for h in hosts)


def hostfile_text(hosts: list[Host], family: str) -> str:
    """A hostfile `family`'s mpiexec reads as exactly these hosts and slots."""
    if family == "openmpi":
        return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)
    return "".join(f"{h.name}:{h.slots}\n" for h in hosts)


def reads_alike(hosts: list[Host], family: str) -> bool:
    """Whether `family`'s mpiexec reads the file these came from as we did, so that it
    can be handed over unchanged: counts in its own syntax, each host listed once
    (MPICH also reads a bare host as one slot; Open MPI would count cores)."""
    own = {"openmpi": ("openmpi",), "mpich": ("mpich", "plain")}[family]
    return all(h.syntax in own for h in hosts)


def check_resolvable(hosts: list[Host]) -> None:
    for host in hosts:
        try:
            socket.getaddrinfo(host.name.strip("[]"), None)
        except (socket.gaierror, UnicodeError):
            raise UserError(f"{host.where}: unknown host {host.name!r} (its name does not resolve)") from None
