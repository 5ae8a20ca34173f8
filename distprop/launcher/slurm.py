"""Inside a Slurm allocation: its nodes and slots from the environment Slurm sets,
and whether `srun` can start MPI ranks itself (PMIx)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from distprop.errors import UserError
from distprop.launcher.hosts import Host


@dataclass
class Allocation:
    job_id: str
    hosts: list[Host]  # slots: the tasks Slurm planned for each node (else its CPUs)
    tasks: int | None  # SLURM_NTASKS, when the job asked for a task count
    gpus_per_node: int | None


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: "a[1-2,4],b" -> ["a[1-2,4]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _expand_range(body: str, where: str) -> list[str]:
    out = []
    for piece in body.split(","):
        low, dash, high = piece.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise UserError(f"{where}: cannot read the range [{body}]")
        width = len(low)  # node[01-10] keeps its zero padding
        out += [str(n).zfill(width) for n in range(int(low), int(high if dash else low) + 1)]
    return out


def expand_hostlist(text: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Slurm's compressed host list: "gpu[01-03,07],login-[1-2]x" -> gpu01 ... login-2x."""
    names = []
    for item in _split_top_level(text.strip()):
        if not item or item.count("[") != item.count("]"):
            raise UserError(f"{where}={text!r}: cannot read {item!r}")
        expanded = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            choices = _expand_range(body, f"{where}={text!r}") if body else [""]
            expanded = [head + literal + choice for head in expanded for choice in choices]
        names += expanded
    return names


def expand_counts(text: str, where: str) -> list[int]:
    """Slurm's per-node counts: "4(x2),2" -> [4, 4, 2]."""
    counts = []
    for item in text.split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not found:
            raise UserError(f"{where}={text!r}: cannot read {item!r}")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def allocation(environ) -> Allocation | None:
    """The allocation this process runs in, or None outside Slurm."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError(f"SLURM_JOB_ID={job_id} is set but SLURM_JOB_NODELIST is not: run inside sbatch/salloc, "
                        "or unset SLURM_JOB_ID")
    names = expand_hostlist(nodelist)
    source = "SLURM_TASKS_PER_NODE" if environ.get("SLURM_TASKS_PER_NODE") else "SLURM_JOB_CPUS_PER_NODE"
    counts = expand_counts(environ.get(source) or f"1(x{len(names)})", source)
    if len(counts) != len(names):
        raise UserError(f"{source} gives {len(counts)} counts for the {len(names)} nodes of SLURM_JOB_NODELIST")
    hosts = [Host(name, count, f"Slurm job {job_id}", "plain") for name, count in zip(names, counts)]
    tasks = environ.get("SLURM_NTASKS")
    gpus = re.search(r"(\d+)$", environ.get("SLURM_GPUS_ON_NODE") or environ.get("SLURM_GPUS_PER_NODE") or "")
    return Allocation(job_id, hosts, int(tasks) if tasks and tasks.isdigit() else None,
                      int(gpus.group(1)) if gpus else None)


def srun_offers_pmix(srun: str) -> bool:
    """Whether `srun --mpi=list` names a PMIx plugin (Open MPI 5 needs PMIx: PMI-2 is gone)."""
    try:
        out = subprocess.run([srun, "--mpi=list"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "pmix" in (out.stdout + out.stderr).lower()
