"""This node's cores and GPUs, as an MPI launcher counts them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def physical_cores() -> int:
    """Cores this process may run on, counting hyperthreads of one core once (Open
    MPI's default slots: more ranks than this is oversubscribing)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:  # no sysfs (not Linux, some containers): count logical CPUs
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def gpu_count(environ) -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES where set, else what
    `nvidia-smi -L` lists (0 where it is absent). Asked without importing cupy, which
    takes seconds and would hold a CUDA context in the launcher."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
