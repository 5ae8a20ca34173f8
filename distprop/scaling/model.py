"""Step time and scaling efficiency of data-parallel training at p ranks.

    T_step(p) = T_data + T_fwd + kappa * T_bwd + T_exposed(p) + T_opt + T_jitter(p)

Gradients are packed into buckets in the order backward finishes them (the first
bucket smaller, so communication starts early). Bucket k is ready when backward is
F_k done: r_k = T_data + T_fwd + kappa * T_bwd * F_k. One reduction runs at a time,
in bucket order (a two-stage flow shop, as in WFBP / MG-WFBP / PyTorch DDP):

    s_k = max(r_k, e_{k-1});   e_k = s_k + T_ar(b_k, p);
    T_exposed = max(0, e_K - (T_data + T_fwd + kappa * T_bwd))

That holds where communication runs beside the computation (a GPU with its own
copy engines and NIC). Where CPU ranks already fill their host's cores, as on this
machine, the reduction inside a node (the hierarchy's node-local part: summing
and copying through shared memory) is work for those same cores and is hidden by
nothing: it adds to the step in full. What waits on a wire (everything else) still
overlaps backward as above. When a node holds more ranks than cores, the kernel
shares the cores out evenly, so every rank computes at cores / (ranks x threads)
of a core's speed. (Costing it as the busiest core running ceil(ranks x threads /
cores) ranks' steps back to back over-predicted 3 ranks on 2 cores by 16-40%
here, about the 2 / 1.5 that even sharing accounts for.) Hosts that are network
namespaces of one machine share its cores for their links as well: sending and
receiving is the kernel's work on those cores, and in each step of a ring every
rank sends and receives, so the wire time stretches by the same factor. (Without
it, 3 such hosts on 2 cores were predicted at 167 ms a step and measured at 241.)

T_jitter = sigma * sqrt(2 ln p) is the expected maximum of p normal compute-time
deviations: the slowest rank sets the pace. Efficiency is weak scaling: the
per-rank batch is fixed and E(p) = T_step(1) / T_step(p), with T_step(1) free of
communication; throughput = p * batch / T_step(p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distprop.scaling.allreduce import Fabric, allreduce_time, node_local, nodes

MB = 1024 * 1024


@dataclass(frozen=True)
class Host:
    """CPU ranks: the node's cores and each rank's threads (reductions run on them too).
    shared: every node's ranks share these cores (hosts that are network namespaces
    of one machine)."""
    cores: int
    threads_per_rank: int = 1
    shared: bool = False

    def oversubscription(self, ranks_on_node: int) -> float:
        """How much slower each rank computes than on cores of its own."""
        return max(1.0, ranks_on_node * self.threads_per_rank / self.cores)


@dataclass(frozen=True)
class Prediction:
    ranks: int
    step_s: float
    compute_s: float  # the step without communication, as this many ranks run it
    allreduce_s: float  # sum of the buckets' allreduce times
    exposed_s: float  # communication the step waits for
    efficiency: float
    throughput: float  # units (samples, tokens) per second over all ranks
    buckets: int


def make_buckets(gradients, cap_bytes: float, first_cap_bytes: float) -> list[tuple[float, float]]:
    """(bytes, ready fraction) per bucket from (bytes, ready) per gradient in backward
    order: consecutive gradients up to the cap; one larger than the cap alone."""
    buckets, size, ready, cap = [], 0.0, 0.0, first_cap_bytes
    for nbytes, when in gradients:
        if size and size + nbytes > cap:
            buckets.append((size, ready))
            size, cap = 0.0, cap_bytes
        size += nbytes
        ready = when
    if size:
        buckets.append((size, ready))
    return buckets


def exposed_time(ready_times, reduction_times, backward_end: float) -> float:
    """The flow shop: one reduction at a time, each starting when its bucket is ready
    and the previous one is done; what is left after backward ends."""
    end = 0.0
    for ready, duration in zip(ready_times, reduction_times):
        end = max(ready, end) + duration
    return max(0.0, end - backward_end)


def predict(workload, fabric: Fabric, algorithm: str, ranks: int, *, bucket_mb: float = 25.0,
            first_bucket_mb: float = 1.0, buckets=None, kappa: float = 1.0, sigma: float = 0.0,
            host: Host | None = None, contention: float = 1.0) -> Prediction:
    """Step time at `ranks` ranks. buckets: (bytes, ready) per bucket instead of the
    workload's measured ones or its gradients bucketed by bucket_mb. host: CPU ranks
    (see the module docstring). contention: how much longer communication takes
    inside a step than alone (competing for cores, memory and links), fitted where
    a synchronised step was measured."""
    if buckets is None and workload.buckets is not None:
        buckets = workload.buckets
    if buckets is None:
        buckets = make_buckets(workload.gradients, bucket_mb * MB, first_bucket_mb * MB)
    backward = kappa * workload.backward_s
    before_backward = workload.data_s + workload.forward_s
    compute = before_backward + backward + workload.optimizer_s
    reductions = [allreduce_time(algorithm, size, ranks, fabric) for size, _ in buckets] if ranks > 1 else []
    crowding, on_cores = 1, [0.0] * len(reductions)
    if host is not None:
        g = nodes(ranks, fabric)[0]
        crowding = host.oversubscription(ranks if host.shared else g)
        if algorithm == "hier":
            on_cores = [node_local(size, g, fabric) for size, _ in buckets] if ranks > 1 else []
    on_wire = [total - cpu for total, cpu in zip(reductions, on_cores)]
    if host is not None and host.shared:  # the links are the shared cores' work too
        on_wire = [crowding * seconds for seconds in on_wire]
    ready = [crowding * (before_backward + backward * when) for _, when in buckets]
    exposed = contention * (crowding * sum(on_cores)
                            + exposed_time(ready, on_wire, crowding * (before_backward + backward)))
    jitter = sigma * math.sqrt(2 * math.log(ranks)) if ranks > 1 else 0.0
    step = crowding * compute + exposed + jitter
    alone = workload.single_rank_s or workload.compute_s * (host.oversubscription(1) if host is not None else 1)
    return Prediction(ranks=ranks, step_s=step, compute_s=crowding * compute, allreduce_s=sum(reductions),
                      exposed_s=exposed + jitter, efficiency=alone / step,
                      throughput=ranks * workload.batch / step, buckets=len(buckets))
