"""One rank of a weak-scaling run: the MLP 784-1024-1024-10, a fixed batch per rank,
SGD with momentum, gradients averaged every step. Run by `distprop bench scaling`
under mpiexec (distprop) or torchrun (PyTorch DDP with gloo, the reference).

Prints one line on rank 0: `throughput <samples per second over all ranks>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _data(rank: int, batch: int):
    rng = np.random.default_rng(rank)
    return rng.standard_normal((batch, 784)).astype(np.float32), rng.integers(0, 10, batch)


def _report_throughput(step, barrier, rank: int, size: int, batch: int, steps: int, warmup: int) -> None:
    """Time `steps` calls of `step` after `warmup` ones, the ranks starting and
    ending together; rank 0 prints the samples per second of the whole job."""
    for _ in range(warmup):
        step()
    barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"throughput {size * batch * steps / elapsed:.1f}", flush=True)


def run_distprop(batch: int, steps: int, warmup: int) -> None:
    import distprop as dp
    import distprop.functional as F
    from distprop import optim
    from distprop.nn.models import MLP

    comm = dp.init(threads=1)
    dp.manual_seed(0)
    net = MLP(784, [1024, 1024], 10)
    model = dp.DataParallel(net, comm)
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(comm.rank, batch)
    x = dp.tensor(x)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    _report_throughput(step, comm.barrier, comm.rank, comm.size, batch, steps, warmup)
    model.close()


def run_torch(batch: int, steps: int, warmup: int) -> None:
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

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    _report_throughput(step, dist.barrier, rank, size, batch, steps, warmup)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=("distprop", "torch"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    runner = run_distprop if args.framework == "distprop" else run_torch
    runner(args.batch, args.steps, args.warmup)


if __name__ == "__main__":
    main()
