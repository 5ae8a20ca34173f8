"""Fabric presets: link latency and bandwidth for common interconnects.

Bandwidths are allreduce bus bandwidths (nccl-tests' busbw, so that
beta = 1/busbw in the alpha-beta formulas) as published; where only a line rate is
known (Ethernet over TCP), 85% of it, a figure that is not confirmed by a
measurement in the reference notes. GPU clusters have 8 ranks per node joined by
NVLink (A100, 230 GB/s busbw, 3.4 us per step in NCCL's model) and one network
interface per node (`nics` multiplies its bandwidth for multi-rail nodes).

`shm` is this machine, measured: see distprop.scaling.calibrate.
"""

from __future__ import annotations

from dataclasses import replace

from distprop.errors import UserError
from distprop.scaling.allreduce import Fabric, Link
from distprop.scaling.model import Host

GB = 1e9
US = 1e-6
NVLINK_A100 = Link(alpha=3.4 * US, beta=1 / (230 * GB))
ETHERNET_EFFICIENCY = 0.85  # of line rate, over TCP (unconfirmed)
ETHERNET_LATENCY = 20 * US  # per message over TCP (unconfirmed: 10-30 us)
NCCL_NETWORK_STEP = 9.6 * US  # NCCL's per-step latency on a network hop (tuning.cc)


def _ethernet(gbit: int) -> Fabric:
    busbw = gbit / 8 * GB * ETHERNET_EFFICIENCY
    return Fabric(name=f"eth-{gbit}", description=f"{gbit} Gb/s Ethernet (TCP), 8 GPUs per node on NVLink",
                  intra=NVLINK_A100, inter=Link(alpha=ETHERNET_LATENCY, beta=1 / busbw), ranks_per_node=8,
                  source=f"line rate {gbit / 8:g} GB/s x {ETHERNET_EFFICIENCY} (assumed), latency 20 us (assumed)")


def _infiniband(name: str, gbit: int, busbw_gb: float, source: str) -> Fabric:
    return Fabric(name=f"ib-{gbit}", description=f"InfiniBand {name} {gbit} Gb/s, 8 GPUs per node on NVLink",
                  intra=NVLINK_A100, inter=Link(alpha=NCCL_NETWORK_STEP, beta=1 / (busbw_gb * GB)),
                  ranks_per_node=8, source=f"busbw {busbw_gb} GB/s ({source}); 9.6 us per NCCL network step")


PRESETS = {
    **{f.name: f for f in (_ethernet(25), _ethernet(100), _ethernet(200), _ethernet(400))},
    "ib-100": _infiniband("EDR", 100, 12.2, "nccl-tests#29"),
    "ib-200": _infiniband("HDR", 200, 24.0, "nccl#412"),
    "ib-400": _infiniband("NDR", 400, 47.0, "nccl-tests#290, #267"),
    "nvlink": Fabric(name="nvlink", description="one NVLink/NVSwitch domain holding every rank (A100 figures)",
                     intra=NVLINK_A100, inter=NVLINK_A100, ranks_per_node=1 << 30,
                     source="busbw 230 GB/s (nccl-tests#175), 3.4 us per step (tuning.cc)"),
}
NAMES = ("shm",) + tuple(PRESETS)


def preset(name: str, *, ranks_per_node: int | None = None, nics: int = 1, calibration: dict | None = None) -> Fabric:
    """The fabric `name`; `shm` needs a calibration (measured on this machine)."""
    if name == "shm":
        if calibration is None:
            raise UserError("--fabric shm is this machine's shared memory: it needs measurements "
                            "(--calibration FILE from `distprop scale --calibrate`)")
        fabric = shm_fabric(calibration)
    elif name in PRESETS:
        fabric = PRESETS[name]
    else:
        raise UserError(f"--fabric: unknown fabric {name!r}; choose from {', '.join(NAMES)}")
    if nics != 1:
        fabric = replace(fabric, inter=replace(fabric.inter, beta=fabric.inter.beta / nics),
                         description=f"{fabric.description}, {nics} NICs per node")
    if ranks_per_node is not None:
        fabric = fabric.with_ranks_per_node(ranks_per_node)
    return fabric


def measured_link(fit: dict, ranks: int) -> Link:
    """The link under a measured allreduce: a ring over p ranks costs
    2(p-1) alpha + 2(p-1)/p n beta, so a fit t = a + n b at p ranks is the link
    alpha = a / 2(p-1), beta = b p / 2(p-1)."""
    steps = 2 * (ranks - 1)
    return Link(alpha=fit["alpha"] / steps, beta=fit["beta"] * ranks / steps)


def shm_fabric(calibration: dict) -> Fabric:
    """This machine as measured: the ranks of a node average gradients through shared
    memory at the measured cost per bucket (a + b * bytes), nodes (one rank each,
    when calibrated across hosts) through MPI's allreduce at the measured link. One
    node unless the calibration ran across hosts.

    Between the nodes the allreduce is distprop's (`allreduce.mpi_ring`): MPI's own
    (recursive halving and doubling, Rabenseifner's; Thakur, Rabenseifner & Gropp
    2005) on 2 ranks, where it costs what a ring costs, and distprop's ring for large
    buckets on 3, where the library's choice would fold a rank in and out with the
    whole bucket.
    """
    ranks, per_node = calibration["ranks"], calibration["ranks_per_node"]
    fits = calibration["transports"]
    node = Link(alpha=fits["shm"]["alpha"], beta=fits["shm"]["beta"]) if "shm" in fits else None
    link = measured_link(fits["mpi"], ranks) if "mpi" in fits else Link(alpha=0.0, beta=0.0)
    where = "shared memory" if per_node > 1 else "MPI between hosts"
    return Fabric(name="shm", description=f"this machine, {where} ({calibration['machine']['cores']} cores)",
                  intra=link, inter=link, ranks_per_node=(1 << 30) if per_node > 1 else 1, node_reduction=node,
                  between_nodes="mpi-ring",
                  source=f"measured by distprop scale --calibrate at {ranks} ranks")


def measured_host(calibration: dict) -> Host:
    """This machine's CPU ranks as calibrated: cores, threads per rank, and whether
    the hosts were namespaces of this one machine (then all ranks share its cores)."""
    return Host(cores=calibration["machine"]["cores"], threads_per_rank=calibration["threads_per_rank"],
                shared=calibration["machine"].get("nodes_share_cores", False))
