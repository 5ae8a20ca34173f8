"""One rank of a weak-scaling run: the MLP 784-1024-1024-10, a fixed batch per rank,
SGD with momentum. Run by `distprop bench scaling` under mpiexec (distprop) or
torchrun (PyTorch DDP with gloo, the reference).

The job alternates, round after round, between two phases of `steps` steps:
- "sync": the data-parallel model, gradients averaged every step;
- "baseline": the same ranks stepping the bare model, no gradient exchange at all:
  the machine's own limit for this many ranks (they still share its cores and
  memory bandwidth).
Alternating inside one job lets both see the same machine (other load, caches,
clock), which separate jobs on a shared machine do not.

Prints on rank 0: `throughput <sync samples/s>` and `baseline <samples/s>`, each
the median over rounds of the whole job's samples per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _data(rank: int, batch: int):
    rng = np.random.default_rng(rank)
    return rng.standard_normal((batch, 784)).astype(np.float32), rng.integers(0, 10, batch)


def _alternate(phases: dict, barrier, rank: int, size: int, batch: int, steps: int, warmup: int,
               rounds: int) -> None:
    """Time each phase's step function for `steps` steps per round, the ranks
    starting and ending each phase together; rank 0 prints each phase's median."""
    for step in phases.values():
        for _ in range(warmup):
            step()
    rates = {name: [] for name in phases}
    for _ in range(rounds):
        for name, step in phases.items():
            barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            barrier()
            rates[name].append(size * batch * steps / (time.perf_counter() - start))
    if rank == 0:
        for name, samples in rates.items():
            print(f"{name} {statistics.median(samples):.1f}", flush=True)


def run_distprop(batch: int, steps: int, warmup: int, rounds: int, transport: str | None) -> None:
    import distprop as dp
    import distprop.functional as F
    from distprop import optim
    from distprop.nn.models import MLP

    comm = dp.init(threads=1)
    dp.manual_seed(0)
    net = MLP(784, [1024, 1024], 10)
    model = dp.DataParallel(net, comm, transport=transport)
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(comm.rank, batch)
    x = dp.tensor(x)

    def step(forward):
        def run():
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        return run

    _alternate({"throughput": step(model), "baseline": step(net)}, comm.barrier, comm.rank, comm.size,
               batch, steps, warmup, rounds)
    model.close()


def run_torch(batch: int, steps: int, warmup: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = (torch.from_numpy(a) for a in _data(rank, batch))

    def step(forward):
        def run():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
        return run

    _alternate({"throughput": step(model), "baseline": step(net)}, dist.barrier, rank, size, batch, steps,
               warmup, rounds)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=("distprop", "torch"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per phase and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--transport", default=None, help="distprop only: DataParallel's transport")
    args = parser.parse_args()
    if args.framework == "distprop":
        run_distprop(args.batch, args.steps, args.warmup, args.rounds, args.transport)
    else:
        run_torch(args.batch, args.steps, args.warmup, args.rounds)


if __name__ == "__main__":
    main()
