"""`mpiexec -n N distprop bench sync`: what gradient synchronisation adds to a step of
the MLP 784-1024-1024-10, against one raw mpi4py `Allreduce` of a flat buffer of
the same byte count.

The synchronisation time is measured where it matters, in the step: forward and
backward through DataParallel minus the same forward and backward of the bare
model run right before it on the same rank (the median of many such pairs; the
slowest rank counts). Overlap with backward can make it smaller than the allreduce
it contains. The raw Allreduce is timed back to back, as nccl-tests does.
"""

from __future__ import annotations

import time

import numpy as np

from distprop.bench.timing import environment_note, median

CONFIGURATIONS = {
    "default": {},  # shared memory where ranks share a node
    "thread": {"transport": "thread"},
    "thread packed": {"transport": "thread", "inplace_mb": 1e9},
    "iallreduce": {"transport": "iallreduce"},
}


def configure(parser) -> None:
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=6)


def run(args) -> int:
    import distprop as dp
    import distprop.functional as F
    from distprop.nn.models import MLP

    comm = dp.init()
    if comm.size == 1:
        print("run under mpiexec -n N (N >= 2): a single rank has nothing to synchronise")
        return 2
    from mpi4py import MPI

    dp.manual_seed(0)
    net = MLP(784, [1024, 1024], 10)
    rng = np.random.default_rng(comm.rank)
    x = dp.tensor(rng.standard_normal((args.batch, 784)).astype(np.float32))
    y = rng.integers(0, 10, args.batch)
    nbytes = sum(p.data.nbytes for p in net.parameters())
    flat = np.ones(nbytes // 4, np.float32)

    def forward_backward(model):
        def step():
            net.zero_grad()
            F.cross_entropy(model(x), y).backward()
        return step

    def seconds(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    def raw_allreduce() -> float:
        """Mean time of back-to-back calls, as nccl-tests measures."""
        comm.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            comm.mpi_comm.Allreduce(MPI.IN_PLACE, flat)
        return (time.perf_counter() - start) / args.repeats

    bare = forward_backward(net)  # no wrapper: no reducer waits for this backward
    raw, differences = [], {name: [] for name in CONFIGURATIONS}
    for name, options in CONFIGURATIONS.items():  # one at a time: each points the gradients into its buckets
        model = dp.DataParallel(net, comm, **options)
        synchronised = forward_backward(model)
        synchronised()
        bare()
        for _ in range(args.rounds):
            raw.append(raw_allreduce())
            for _ in range(args.repeats):  # paired: a bare step right before each synchronised one
                comm.barrier()
                differences[name].append(seconds(synchronised) - seconds(bare))
        model.close()
    # The slowest rank sets the pace of a synchronous job.
    sync = {name: comm.allreduce(median(d), "max") for name, d in differences.items()}
    raw_time = comm.allreduce(median(raw), "max")
    bare_time = comm.allreduce(median([seconds(bare) for _ in range(args.repeats)]), "max")
    if comm.rank == 0:
        print(environment_note())
        print(f"{comm.size} ranks, {getattr(comm, 'threads', '?')} threads each; gradients {nbytes / 2**20:.2f} MiB; "
              f"raw Allreduce {raw_time * 1e3:.3f} ms; bare forward+backward {bare_time * 1e3:.2f} ms")
        print(f"{'configuration':14} {'sync ms':>8} {'sync / raw':>10}   (median of {args.rounds * args.repeats} "
              "paired steps, slowest rank)")
        for name in CONFIGURATIONS:
            print(f"{name:14} {sync[name] * 1e3:8.3f} {sync[name] / raw_time:10.2f}")
        print("target: sync / raw <= 1.1 (default configuration)")
    return 0
