"""Measurements the cost model is fitted to, made by a job on this machine.

Run on every rank of a job (`distprop scale --calibrate` starts it):
- each gradient transport's time for one bucket, 4 KB to 16 MB, ranks starting
  together (the slowest rank's time, median of repeats), fitted to t = alpha +
  n * beta (see fit_alpha_beta) ('shm': distprop's shared-memory
  reduction; 'mpi': a blocking MPI allreduce, the path between nodes);
- the workload with no communication, every rank at once (so the ranks contend
  for the machine as in a real job): forward, backward and optimizer times, when
  backward finishes each gradient (post-accumulate hooks), and the buckets
  DataParallel makes of them;
- the synchronised step, alternated with the step without communication in the
  same job, to hold the model's prediction against.

Rank 0 writes the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

SIZES = tuple(4096 * 4 ** i for i in range(7))  # 4 KB .. 16 MB
CAP_BYTES, FIRST_CAP_BYTES, INPLACE_BYTES = 25 * 2 ** 20, 2 ** 20, 2 ** 20  # DataParallel's CPU defaults


def fit_alpha_beta(points) -> tuple[float, float, str | None]:
    """alpha, beta of t = alpha + n * beta from measured (n, seconds), and why beta
    was not the fitted slope (None when it was). beta is the least-squares slope
    over the larger half of the sizes (where bandwidth rules), alpha the median of
    t - n * beta over the smaller half (where latency rules). A fit of all points at
    once lets a few flat small-message times (a shaped link releases packets in
    ticks) pull the slope down to nothing.

    A slope of zero or less (load from elsewhere slowing the smaller messages more
    than the larger ones) measures nothing; a bandwidth-free link would predict
    communication that costs nothing at any size. beta then comes from the largest
    message's time beyond the small messages' latency, or, where that is not
    positive either, from its whole time (alpha then 0) -- never zero."""
    ordered = sorted(points)
    half = len(ordered) // 2
    large = np.array(ordered[half:], float)
    if len(large) >= 2:
        beta = float(np.polyfit(large[:, 0], large[:, 1], 1)[0])
    else:
        beta = ordered[-1][1] / ordered[-1][0]
    note = None
    if not beta > 0:
        slope, (n, t) = beta, ordered[-1]
        latency = float(np.median([t for _, t in ordered[:max(half, 1)]]))
        beta = (t - latency) / n if t > latency else t / n
        note = (f"the fitted slope over the larger sizes was {slope:.3g} s/B (not positive): beta from the "
                f"{n}-byte message's time" + (" beyond the small messages' latency" if t > latency else ""))
    alpha = float(np.median([t - n * beta for n, t in ordered[:max(half, 1)]]))
    if note is not None:  # the line may not pass above the message beta came from
        alpha = min(alpha, ordered[-1][1] - ordered[-1][0] * beta)
    return max(alpha, 0.0), beta, note


def _slowest(comm, seconds: float) -> float:
    return comm.allreduce(seconds, "max")


def time_transport(comm, kind: str, nbytes: int, repeats: int) -> float:
    """Median over repeats of the slowest rank's time to average one bucket of nbytes."""
    from distprop import nn
    from distprop.parallel.compression import get_compression
    from distprop.parallel.reducer import Bucket
    from distprop.parallel.transports import make_transport

    compression = get_compression(None)
    count = max(1, nbytes // 4)
    param = nn.Parameter(np.zeros(count, np.float32))
    transport = make_transport(kind, comm, False, [(count, np.dtype(np.float32))], compression)
    try:
        buffer = transport.bucket_buffers()[0] if hasattr(transport, "bucket_buffers") else None
        bucket = Bucket(0, [param], ["calibration"], compression, buffer)
        param.grad = np.ones(count, np.float32)
        bucket.stage(0)
        samples = []
        for i in range(repeats + 3):
            comm.barrier()
            start = time.perf_counter()
            work = transport.start(bucket)
            transport.finish()
            work.wait()
            elapsed = _slowest(comm, time.perf_counter() - start)
            if i >= 3:
                samples.append(elapsed)
        return statistics.median(samples)
    finally:
        transport.close()


def measure_transports(comm, kinds, repeats: int) -> dict:
    fits = {}
    for kind in kinds:
        name = "mpi" if kind == "thread" else kind
        points = [(n, time_transport(comm, kind, n, repeats)) for n in SIZES]
        alpha, beta, note = fit_alpha_beta(points)
        fits[name] = {"transport": kind, "alpha": alpha, "beta": beta, "points": points}
        if note is not None:
            fits[name]["beta_note"] = note
    return fits


def _mlp(hidden):
    from distprop.nn.models import MLP

    return MLP(784, hidden, 10)


def measure_workload(comm, hidden, batch: int, steps: int, rounds: int) -> dict:
    """The model's phases with no communication, gradient readiness, DataParallel's
    buckets, and the synchronised step against the unsynchronised one."""
    import distprop as dp
    import distprop.functional as F
    from distprop import optim
    from distprop.parallel.reducer import assign_buckets

    dp.manual_seed(0)
    net = _mlp(hidden)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    model = dp.DataParallel(net, comm) if comm.size > 1 else net
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(comm.rank)
    x = dp.tensor(rng.standard_normal((batch, 784)).astype(np.float32))
    y = rng.integers(0, 10, batch)
    finished = {}
    handles = [p.register_post_accumulate_grad_hook(
        lambda param, name=n: finished.__setitem__(name, time.perf_counter())) for n, p in named]
    phases = {"forward_s": [], "backward_s": [], "optimizer_s": []}
    ready = {n: [] for n, _ in named}

    def step(forward, record: bool):
        opt.zero_grad()
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if record:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[key].append(value)
            for name, when in finished.items():
                ready[name].append((when - t1) / (t2 - t1))

    for _ in range(5):
        step(net, False)
        step(model, False)
    rates = {"sync": [], "baseline": []}
    for _ in range(rounds):  # alternating, so that both see the same machine
        for kind, forward in (("baseline", net), ("sync", model)):
            comm.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step(forward, kind == "baseline")
            comm.barrier()
            rates[kind].append((time.perf_counter() - start) / steps)
    for handle in handles:
        handle.remove()
    if model is not net:
        model.close()
    means = {key: comm.allreduce(statistics.median(values), "mean") for key, values in phases.items()}
    fraction = {name: comm.allreduce(statistics.median(values), "mean") for name, values in ready.items()}
    groups = assign_buckets(list(reversed(named)), CAP_BYTES, FIRST_CAP_BYTES, INPLACE_BYTES)
    return {
        "name": "mlp-" + "-".join(map(str, [784, *hidden, 10])),
        "description": f"MLP 784-{'-'.join(map(str, hidden))}-10, batch {batch} per rank, this machine",
        "batch": batch, "steps": steps, "rounds": rounds, **means,
        "gradients": [{"name": n, "bytes": int(p.data.nbytes), "ready": fraction[n]} for n, p in reversed(named)],
        "buckets": [{"names": [n for n, _ in g], "bytes": int(sum(p.data.nbytes for _, p in g)),
                     "ready": max(fraction[n] for n, _ in g)} for g in groups],
        "baseline_step_s": statistics.median(rates["baseline"]),
        "sync_step_s": statistics.median(rates["sync"]),
    }


def machine() -> dict:
    return {"host": platform.node(), "cores": os.cpu_count() or 1, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def boot_id() -> str:
    """The same for every process of one running kernel, network namespaces included."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return platform.node()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distprop.scaling.calibrate")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--hidden", default="1024,1024", help="the MLP's hidden widths")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="steps per phase and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="timings per transport and size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transports", default="shm,thread", help="comma-separated; '' for none")
    args = parser.parse_args(argv)

    import distprop as dp

    comm = dp.init(threads=args.threads)
    hidden = [int(h) for h in args.hidden.split(",")]
    kinds = [k for k in args.transports.split(",") if k] if comm.size > 1 else []
    if "shm" in kinds and comm.local_size == 1:
        kinds.remove("shm")  # one rank per node: nothing to share
    # Hosts that are namespaces of one machine share its cores (the model must know).
    kernels = set(comm.allgather_object(boot_id()))
    result = {"ranks": comm.size, "ranks_per_node": comm.local_size, "threads_per_rank": args.threads,
              "machine": {**machine(), "nodes_share_cores": len(kernels) == 1 and comm.local_size < comm.size}, "transports": measure_transports(comm, kinds, args.repeats),
              "workload": measure_workload(comm, hidden, args.batch, args.steps, args.rounds)}
    if comm.rank == 0:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
