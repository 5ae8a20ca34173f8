"""Alpha-beta costs of the allreduce algorithms, on a fabric of nodes.

A link costs `alpha` seconds per message and `beta` seconds per byte; reducing
costs `gamma` seconds per byte. A fabric has `ranks_per_node` ranks on each node,
an `intra` link between the ranks of a node and an `inter` link between nodes
(each node's ranks share one network interface: the usual 8 GPUs and one NIC per
node, or rails counted into the link's bandwidth). For p ranks, N = ceil(p/g)
nodes (g = ranks_per_node, or p where p < g).

Formulas (n bytes; the sources are in the reference notes on scaling models):
- ring (Patarasuk & Yuan 2009): 2(p-1) steps of n/p bytes. Each of the N node
  boundaries is crossed by the ring, so 2(N-1) of the steps take the inter link's
  latency, the rest the intra link's; the bytes go at the slowest link the ring
  crosses. Bandwidth term 2(p-1)/p * n * beta, reduction (p-1)/p * n * gamma.
- rhd, recursive halving and doubling (Thakur, Rabenseifner & Gropp 2005):
  2 lg p latencies and the ring's bandwidth term when p is a power of two; otherwise
  the extra ranks fold into neighbours first: (2 floor(lg p) + 2) alpha and
  (2(p-1)/p + 2) n beta.
- tree, NCCL's double binary tree (NCCL tuning model): latency 2((g-1) alpha_intra
  + ceil(lg N) alpha_inter), bandwidth half the bus bandwidth: 2 n beta.
- hier, distprop's own order: a reduce-scatter and allgather inside each node
  (ring formula over g ranks on the intra link; for distprop's shared-memory
  transport, measured directly), and between the nodes an allreduce of each rank's
  n/g shard -- all g shards through the node's one interface, so the inter term
  carries the whole n: 2(N-1) alpha_inter + 2(N-1)/N n beta_inter (a ring between
  the nodes, as NCCL runs it). Where the nodes' part goes through MPI (distprop's
  transports between hosts), the fabric says `between_nodes="mpi-ring"`.
- mpi-ring, distprop's allreduce of host buffers over MPI: a ring of its own on rank
  counts that are not powers of two, for large buckets (distprop.parallel.ring);
  elsewhere the MPI library's recursive halving and doubling (rhd above), which on
  those counts would pay the fold.

Any algorithm on one node (N = 1) uses the intra link only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from distprop.parallel.ring import prefers_ring


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message
    beta: float  # seconds per byte
    gamma: float = 0.0  # seconds per byte reduced

    @property
    def bandwidth(self) -> float:
        """Bytes per second (1/beta)."""
        return 1.0 / self.beta if self.beta > 0 else math.inf


@dataclass(frozen=True)
class Fabric:
    name: str
    description: str
    intra: Link
    inter: Link
    ranks_per_node: int
    # A measured node-local reduction: seconds per bucket = a + b * bytes, the
    # whole of the node's reduce-scatter and allgather (distprop's shared memory).
    node_reduction: Link | None = None
    # The allreduce among the nodes in `hier`: "ring" (NCCL), "mpi-ring" (distprop's over
    # MPI) or "rhd" (an MPI library's large-message allreduce).
    between_nodes: str = "ring"
    # Where the fabric's figures come from.
    source: str = ""
    notes: tuple = field(default=())

    def with_ranks_per_node(self, g: int) -> "Fabric":
        return replace(self, ranks_per_node=g)


def nodes(p: int, fabric: Fabric) -> tuple[int, int]:
    """(ranks per node actually used, number of nodes) for p ranks."""
    g = min(p, fabric.ranks_per_node)
    return g, -(-p // g)


def ring(n: float, p: int, fabric: Fabric) -> float:
    if p <= 1:
        return 0.0
    g, count = nodes(p, fabric)
    link = fabric.inter if count > 1 else fabric.intra
    hops_inter = 2 * (count - 1)
    latency = hops_inter * fabric.inter.alpha + (2 * (p - 1) - hops_inter) * fabric.intra.alpha
    return latency + 2 * (p - 1) / p * n * link.beta + (p - 1) / p * n * link.gamma


def rhd(n: float, p: int, fabric: Fabric) -> float:
    if p <= 1:
        return 0.0
    g, count = nodes(p, fabric)
    link = fabric.inter if count > 1 else fabric.intra
    if p & (p - 1) == 0:
        return 2 * math.log2(p) * link.alpha + 2 * (p - 1) / p * n * link.beta + (p - 1) / p * n * link.gamma
    lower = math.floor(math.log2(p))
    return ((2 * lower + 2) * link.alpha + (2 * (p - 1) / p + 2) * n * link.beta
            + (1 + (p - 1) / p) * n * link.gamma)


def mpi_ring(n: float, p: int, fabric: Fabric) -> float:
    """distprop's allreduce of host buffers over MPI: its own ring where that beats
    the library's choice (distprop.parallel.ring), recursive halving and doubling
    (the MPI library's large-message algorithm) elsewhere."""
    return (ring if prefers_ring(p, int(n)) else rhd)(n, p, fabric)


def tree(n: float, p: int, fabric: Fabric) -> float:
    if p <= 1:
        return 0.0
    g, count = nodes(p, fabric)
    link = fabric.inter if count > 1 else fabric.intra
    latency = 2 * ((g - 1) * fabric.intra.alpha + math.ceil(math.log2(count)) * fabric.inter.alpha)
    return latency + 2 * n * link.beta + n * link.gamma


def node_local(n: float, g: int, fabric: Fabric) -> float:
    """Reduce-scatter plus allgather among the g ranks of one node."""
    if g <= 1:
        return 0.0
    if fabric.node_reduction is not None:
        return fabric.node_reduction.alpha + n * fabric.node_reduction.beta
    link = fabric.intra
    return 2 * (g - 1) * link.alpha + 2 * (g - 1) / g * n * link.beta + (g - 1) / g * n * link.gamma


def hier(n: float, p: int, fabric: Fabric) -> float:
    if p <= 1:
        return 0.0
    g, count = nodes(p, fabric)
    across = 0.0
    if count > 1:  # the nodes' interfaces carry the whole n; each rank reduces only its n/g shard
        link = replace(fabric.inter, gamma=fabric.inter.gamma / g)
        between = replace(fabric, intra=link, inter=link, ranks_per_node=1)
        across = ALGORITHMS[fabric.between_nodes](n, count, between)
    return node_local(n, g, fabric) + across


ALGORITHMS = {"ring": ring, "rhd": rhd, "mpi-ring": mpi_ring, "tree": tree, "hier": hier}


def allreduce_time(algorithm: str, n: float, p: int, fabric: Fabric) -> float:
    """Seconds for one allreduce of n bytes over p ranks."""
    return ALGORITHMS[algorithm](n, p, fabric)


def bus_bandwidth(n: float, seconds: float, p: int) -> float:
    """nccl-tests' bus bandwidth of an allreduce: algbw * 2(p-1)/p, in bytes/s."""
    return n / seconds * 2 * (p - 1) / p if seconds > 0 and p > 1 else math.inf


def latency_crossover(algorithm: str, n: float, fabric: Fabric, ranks) -> int | None:
    """The first p in `ranks` where the algorithm's latency terms exceed its
    bandwidth terms for n bytes (where more ranks stop paying for themselves)."""
    for p in ranks:
        bandwidth_only = allreduce_time(algorithm, n, p, _no_latency(fabric))
        latency_only = allreduce_time(algorithm, 0.0, p, fabric)
        if latency_only > bandwidth_only:
            return p
    return None


def _no_latency(fabric: Fabric) -> Fabric:
    def zero(link):
        return None if link is None else replace(link, alpha=0.0)

    return replace(fabric, intra=zero(fabric.intra), inter=zero(fabric.inter),
                   node_reduction=zero(fabric.node_reduction))
