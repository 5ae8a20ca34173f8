"""Deciding how a job starts: on which hosts, how many ranks, through which launcher,
with which flags. Whatever is decided for the user becomes a note they read."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from distprop.errors import UserError
from distprop.launcher import command as commands
from distprop.launcher import hosts as hostlib
from distprop.launcher import mpi, node, slurm

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Request:
    """What the user asked for (the flags of `distprop launch`)."""

    command: list[str]
    ranks: int | None = None
    hostfile: str | None = None
    hosts: str | None = None
    per_node: int | None = None
    gpus_per_node: int | None = None
    bind: str = "none"
    env: list[str] = field(default_factory=list)
    oversubscribe: bool = False
    launcher: str = "auto"  # auto, mpiexec or srun
    mpiexec: str | None = None
    mpiexec_args: str = ""


@dataclass
class Launch:
    argv: list[str]
    assignments: dict[str, str]  # variables set for the command (shown in front of it)
    hostfile: tuple[str, str] | None  # (path, text) of a hostfile written for the MPI
    notes: list[str]

    @property
    def line(self) -> str:
        return commands.shell_line(self.argv, self.assignments)


def parse_env(items: list[str], environ) -> dict[str, str | None]:
    env = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise UserError(f"--env {item!r}: {name!r} is not a variable name")
        if not equals and name not in environ:
            raise UserError(f"--env {name}: {name} is not set here; give --env {name}=VALUE")
        env[name] = value if equals else None
    return env


def _split_args(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:  # an unclosed quote
        raise UserError(f"--mpiexec-args {text!r}: {str(error).lower()}") from None


def plan(request: Request, environ, workdir: Path) -> Launch:
    notes = []
    env = parse_env(request.env, environ)
    allocation = None
    if request.hostfile is not None:
        hosts, source = hostlib.parse_hostfile(request.hostfile), f"hostfile {request.hostfile}"
    elif request.hosts is not None:
        hosts, source = hostlib.parse_host_list(request.hosts), "--hosts"
    else:
        allocation = slurm.allocation(environ)
        hosts = allocation.hosts if allocation else None
        source = f"Slurm job {allocation.job_id}" if allocation else "this machine"
    if hosts is not None and allocation is None:
        hostlib.check_resolvable(hosts)

    job = commands.Job(ranks=0, command=list(request.command), hosts=hosts, bind=request.bind,
                       oversubscribe=request.oversubscribe, env=env, extra=_split_args(request.mpiexec_args))
    cores = node.physical_cores()
    if hosts is None:
        ranks_per_node = _place_here(request, job, environ, cores, notes)
    else:
        ranks_per_node = _place_on_hosts(request, job, allocation, source, notes)
    if request.bind == "core":
        if hosts is None and job.ranks > cores:
            raise UserError(f"--bind core: {job.ranks} ranks cannot each have a core of their own on {cores} cores; "
                            "use --bind none")
        # Nodes are taken to be alike: each rank gets its share of this node's cores.
        job.cores_per_rank = max(1, cores // ranks_per_node)

    if allocation is not None:
        srun, pmix, reason = _choose_srun(request, environ)
        if srun is not None:
            notes.append(f"Slurm job {allocation.job_id}: {job.ranks} ranks on {len(hosts)} node(s) through "
                         f"srun{' --mpi=pmix' if pmix else ''} ({reason})")
            assignments = {name: value for name, value in env.items() if value is not None}
            return Launch(commands.srun_command(srun, job, pmix), assignments, None, notes)
        notes.append(f"Slurm job {allocation.job_id}: {job.ranks} ranks on {len(hosts)} node(s) through mpiexec "
                     f"with the allocation's hostfile ({reason})")
    elif request.launcher == "srun":
        raise UserError("--launcher srun starts the ranks on a Slurm allocation's nodes: "
                        + ("drop --hosts/--hostfile" if hosts else "SLURM_JOB_ID is not set"))

    runtime = mpi.detect(request.mpiexec, environ.get("PATH"))
    notes.insert(0, f"{runtime.name} ({runtime.mpiexec})")
    written = None
    if hosts is not None and (allocation is not None or request.hostfile is not None):
        if allocation is None and hostlib.reads_alike(hosts, runtime.family):
            job.hostfile = request.hostfile  # the user's own file, as the MPI reads it too
        else:
            path = workdir / "hostfile"
            written = (str(path), hostlib.hostfile_text(hosts, runtime.family))
            path.write_text(written[1])
            job.hostfile = str(path)
            if allocation is None:
                notes.append(f"{source} rewritten for {mpi.FAMILY_NAMES[runtime.family]} as {path}")
    if runtime.family == "openmpi":
        as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        argv = commands.openmpi_command(runtime.mpiexec, job, as_root, environ)
    else:
        argv = commands.mpich_command(runtime.mpiexec, job)
    return Launch(argv, {}, written, notes)


def _place_here(request: Request, job: commands.Job, environ, cores: int, notes: list[str]) -> int:
    """Ranks on this machine alone: as many as asked, else one per GPU."""
    gpus = request.gpus_per_node or node.gpu_count(environ)
    job.ranks = request.ranks or request.per_node or gpus
    if not job.ranks:
        raise UserError("how many processes? give -n N (no GPU here to start one process per GPU)")
    if not request.ranks and not request.per_node:
        notes.append(f"{gpus} GPU(s) here: one rank per GPU")
    if request.per_node and job.ranks > request.per_node:
        raise UserError(f"-n {job.ranks} with --ppn {request.per_node} needs more than this machine: "
                        "give --hosts or --hostfile")
    if job.ranks > cores and not request.oversubscribe:
        job.oversubscribe = True
        notes.append(f"{job.ranks} ranks on {cores} cores: oversubscribing")
    if shutil.which(job.command[0], path=environ.get("PATH")) is None:
        raise UserError(f"{job.command[0]}: command not found")
    return job.ranks


def _place_on_hosts(request: Request, job: commands.Job, allocation, source: str, notes: list[str]) -> int:
    """Ranks over listed hosts: as many as asked, else per node times nodes, else every slot."""
    hosts = job.hosts
    gpus = request.gpus_per_node or (allocation.gpus_per_node if allocation else None)
    job.per_node = request.per_node or gpus
    if gpus and not request.per_node:
        notes.append(f"{gpus} GPU(s) per node: one rank per GPU")
    slots = sum(h.slots for h in hosts)
    job.ranks = (request.ranks or (job.per_node * len(hosts) if job.per_node else None)
                 or (allocation.tasks if allocation else None) or slots)
    if job.per_node:
        if job.ranks > job.per_node * len(hosts):
            raise UserError(f"{job.ranks} ranks at {job.per_node} per node need {-(-job.ranks // job.per_node)} "
                            f"hosts; {source} has {len(hosts)}")
        short = [h for h in hosts if h.slots < job.per_node]
        if short and not request.oversubscribe:
            remedy = (f"ask sbatch/salloc for --ntasks-per-node={job.per_node}, or " if allocation else "") + \
                "add --oversubscribe to run more ranks than slots"
            raise UserError(f"{job.per_node} ranks per node but {short[0].where}: {short[0].name} has "
                            f"{short[0].slots} slot(s); {remedy}")
        return job.per_node
    if job.ranks > slots and not request.oversubscribe:
        raise UserError(f"{job.ranks} ranks but {source} has {slots} slot(s) on {len(hosts)} host(s); "
                        "add --oversubscribe to run more ranks than slots")
    return min(job.ranks, max(h.slots for h in hosts))


def _choose_srun(request: Request, environ) -> tuple[str | None, bool, str]:
    """(srun, whether to pass --mpi=pmix, why) inside an allocation; srun None: use mpiexec."""
    if request.launcher == "mpiexec":
        return None, False, "--launcher mpiexec"
    srun = shutil.which("srun", path=environ.get("PATH"))
    if srun is None:
        if request.launcher == "srun":
            raise UserError("--launcher srun: srun is not on PATH")
        return None, False, "srun is not on PATH"
    pmix = slurm.srun_offers_pmix(srun)
    if request.launcher == "srun":
        return srun, pmix, "--launcher srun" + ("" if pmix else "; srun --mpi=list offers no pmix: the site's default")
    try:
        runtime = mpi.detect(request.mpiexec, environ.get("PATH"))
    except UserError:
        runtime = None  # mpi4py built against the site's MPI, no mpiexec of ours: srun it is
    if runtime is not None and runtime.family != "openmpi":
        return None, False, f"{runtime.name}'s mpiexec starts its ranks through Slurm itself"
    if not pmix:
        return None, False, "srun --mpi=list offers no pmix"
    return srun, True, "srun --mpi=list offers pmix"
