"""`mpiexec -n N distprop bench sync`: what gradient synchronisation adds to a step of
the MLP 784-1024-1024-10, against one raw mpi4py `Allreduce` of a flat buffer of
the same byte count.

The synchronisation time is measured where it matters, in the step: forward and
backward through DataParallel minus the same forward and backward of the bare
model on the same rank (interleaved rounds, medians; the slowest rank counts).
Overlap with backward can make it smaller than the allreduce it contains.
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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)


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

    def slowest(function):
        comm.barrier()
        start = time.perf_counter()
        function()
        return comm.allreduce(time.perf_counter() - start, "max")

    def forward_backward(model):
        def step():
            net.zero_grad()
            F.cross_entropy(model(x), y).backward()
        return step

    wrapped = {name: dp.DataParallel(net, comm, **options) for name, options in CONFIGURATIONS.items()}
    for model in wrapped.values():  # hooks of all of them are registered: only one syncs per step
        model.reducer.expecting_sync = False
    functions = {"raw allreduce": lambda: comm.mpi_comm.Allreduce(MPI.IN_PLACE, flat),
                 "bare model": forward_backward(net)}
    functions.update({name: forward_backward(model) for name, model in wrapped.items()})
    samples = {name: [] for name in functions}
    for f in functions.values():
        f()
    for _ in range(args.rounds):
        for name, f in functions.items():
            samples[name] += [slowest(f) for _ in range(args.repeats)]
    times = {name: median(s) for name, s in samples.items()}
    if comm.rank == 0:
        raw, bare = times["raw allreduce"], times["bare model"]
        print(environment_note())
        print(f"{comm.size} ranks, {comm.threads if hasattr(comm, 'threads') else '?'} threads each; "
              f"gradients {nbytes / 2**20:.2f} MiB; raw Allreduce {raw * 1e3:.3f} ms; "
              f"bare forward+backward {bare * 1e3:.2f} ms")
        print(f"{'configuration':14} {'step ms':>8} {'sync ms':>8} {'sync / raw':>10}")
        for name in CONFIGURATIONS:
            sync = times[name] - bare
            print(f"{name:14} {times[name] * 1e3:8.2f} {sync * 1e3:8.3f} {sync / raw:10.2f}")
        print("target: sync / raw <= 1.1 (default configuration)")
    for model in wrapped.values():
        model.close()
    return 0
