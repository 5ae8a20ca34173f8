"""One job, three command lines: Open MPI's mpiexec, MPICH's (Hydra) mpiexec and
Slurm's srun. Each says the same thing in its own dialect."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from distprop.launcher.hosts import Host, host_list

# Variables a rank on another host needs to find the same Python, libraries and
# settings: Open MPI's daemons start there over ssh with a bare environment (MPICH
# passes the whole environment, srun too).
REMOTE_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")


@dataclass
class Job:
    ranks: int
    command: list[str]
    hosts: list[Host] | None = None  # None: this machine only
    hostfile: str | None = None  # the file handed to the MPI (else the hosts go on the command line)
    per_node: int | None = None  # at most this many ranks on each host
    bind: str = "none"  # none, core or socket
    cores_per_rank: int = 1  # with bind == "core"
    oversubscribe: bool = False
    env: dict[str, str | None] = field(default_factory=dict)  # NAME -> VALUE, or None: pass on as set here
    extra: list[str] = field(default_factory=list)  # the user's own mpiexec/srun arguments


def _hosts(job: Job, file_flag: str, list_flag: str) -> list[str]:
    if job.hostfile is not None:
        return [file_flag, job.hostfile]
    return [list_flag, host_list(job.hosts)] if job.hosts else []


def openmpi_command(mpiexec: str, job: Job, as_root: bool, environ) -> list[str]:
    argv = [mpiexec] + (["--allow-run-as-root"] if as_root else []) + ["-n", str(job.ranks)]
    argv += _hosts(job, "--hostfile", "--host")
    mapping = f"ppr:{job.per_node}:node" if job.per_node else "slot"
    if job.bind == "core":
        mapping += f":PE={job.cores_per_rank}"  # each rank bound to cores of its own, for its threads
    if job.per_node or job.bind == "core":
        argv += ["--map-by", mapping]
    argv += ["--bind-to", {"none": "none", "core": "core", "socket": "package"}[job.bind]]
    if job.oversubscribe:
        argv.append("--oversubscribe")
    for name, value in job.env.items():
        argv += ["-x", name if value is None else f"{name}={value}"]
    if job.hosts:
        argv += [a for name in REMOTE_ENVIRONMENT if name in environ and name not in job.env for a in ("-x", name)]
    return argv + job.extra + job.command


def mpich_command(mpiexec: str, job: Job) -> list[str]:
    argv = [mpiexec, "-n", str(job.ranks)] + _hosts(job, "-f", "-hosts")
    if job.per_node:
        argv += ["-ppn", str(job.per_node)]
    argv += ["-bind-to", {"none": "none", "core": f"core:{job.cores_per_rank}", "socket": "socket"}[job.bind]]
    for name, value in job.env.items():
        if value is not None:
            argv += ["-genv", name, value]
    passed = [name for name, value in job.env.items() if value is None]
    if passed:
        argv += ["-genvlist", ",".join(passed)]
    return argv + job.extra + job.command


def srun_command(srun: str, job: Job, pmix: bool) -> list[str]:
    argv = [srun] + (["--mpi=pmix"] if pmix else []) + ["-n", str(job.ranks)]
    if job.per_node:
        argv.append(f"--ntasks-per-node={job.per_node}")
    if job.bind == "core":
        argv += [f"--cpus-per-task={job.cores_per_rank}", "--cpu-bind=cores"]
    else:
        argv.append({"none": "--cpu-bind=none", "socket": "--cpu-bind=sockets"}[job.bind])
    if job.oversubscribe:
        argv.append("--overcommit")
    # One failing rank ends the step instead of leaving the others waiting for it;
    # the variables set for the job reach the ranks (srun passes the environment on).
    argv += ["--kill-on-bad-exit=1", "--export=ALL"]
    return argv + job.extra + job.command


def shell_line(argv: list[str], assignments: dict[str, str]) -> str:
    """The command as a shell would take it, with the variables set for it in front."""
    return " ".join([f"{name}={shlex.quote(value)}" for name, value in assignments.items()] + [shlex.join(argv)])
