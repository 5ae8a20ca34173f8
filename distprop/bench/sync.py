"""`mpiexec -n N distprop bench sync`: what gradient synchronisation adds to a step of
the MLP 784-1024-1024-10, against one raw mpi4py `Allreduce` of a flat buffer of
the same byte count.

Two measures of what synchronisation costs a step, per configuration:
- "thread ms": the time the training thread spends on it (the gradient hooks,
  and waiting for the reductions when backward ends), as the reducer counts it;
  the reductions themselves run on a background thread while backward continues,
  except shared memory's where the ranks fill the cores (then all of them are the
  training thread's, once backward ends);
- "step diff ms": forward and backward through DataParallel minus the same of the
  bare model run right before it on the same rank (the median of many such pairs).
  It also contains what the background thread takes from the training thread's
  core and the ranks' skew, and on a shared, noisy machine it scatters by about a
  millisecond.
The slowest rank counts. The raw Allreduce is timed back to back, as nccl-tests does.
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
    raw, differences, thread_time = [], {name: [] for name in CONFIGURATIONS}, {}
    for name, options in CONFIGURATIONS.items():  # one at a time: each points the gradients into its buckets
        model = dp.DataParallel(net, comm, **options)
        synchronised = forward_backward(model)
        synchronised()
        bare()
        model.reducer.sync_seconds, model.reducer.steps = 0.0, 0
        for _ in range(args.rounds):
            raw.append(raw_allreduce())
            for _ in range(args.repeats):  # paired: a bare step right before each synchronised one
                comm.barrier()
                differences[name].append(seconds(synchronised) - seconds(bare))
        thread_time[name] = comm.allreduce(model.reducer.sync_seconds / model.reducer.steps, "max")
        model.close()
    # The slowest rank sets the pace of a synchronous job.
    sync = {name: comm.allreduce(median(d), "max") for name, d in differences.items()}
    raw_time = comm.allreduce(median(raw), "max")
    bare_time = comm.allreduce(median([seconds(bare) for _ in range(args.repeats)]), "max")
    if comm.rank == 0:
        print(environment_note())
        print(f"{comm.size} ranks, {getattr(comm, 'threads', '?')} threads each; gradients {nbytes / 2**20:.2f} MiB; "
              f"raw Allreduce {raw_time * 1e3:.3f} ms; bare forward+backward {bare_time * 1e3:.2f} ms")
        print(f"{'configuration':14} {'thread ms':>9} {'/ raw':>6} {'step diff ms':>12} {'/ raw':>6}"
              f"   ({args.rounds * args.repeats} steps each)")
        for name in CONFIGURATIONS:
            print(f"{name:14} {thread_time[name] * 1e3:9.3f} {thread_time[name] / raw_time:6.2f} "
                  f"{sync[name] * 1e3:12.3f} {sync[name] / raw_time:6.2f}")
        print("target: synchronisation / raw Allreduce <= 1.1 (default configuration)")
    return 0
