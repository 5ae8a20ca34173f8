"""`distprop bench scaling`: weak scaling of the MLP 784-1024-1024-10 on this machine.

Each rank keeps a batch of 256 samples and one thread. For each rank count the
job alternates between training with gradient averaging and the same ranks
training with no communication at all (the no-communication baseline: what this
machine allows that many ranks, since they share its cores and memory bandwidth);
see scaling_worker. Reported per rank count:
- "vs baseline": throughput / the baseline of the same job: what communication costs;
- "efficiency": throughput / (ranks * the 1-rank throughput): against linear.
PyTorch's DistributedDataParallel (gloo backend) runs the same
model and measurement as the reference; jobs alternate between the two frameworks
and are repeated, and the medians are reported with their ranges.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from distprop.bench.timing import BLAS_SLOWDOWN_VARS, environment_note
from distprop.errors import UserError
from distprop.launcher import is_open_mpi, job_environment, mpiexec_command

WORKER = "distprop.bench.scaling_worker"


def configure(parser) -> None:
    parser.add_argument("--ranks", default="2,3", help="comma-separated rank counts compared with 1 rank")
    parser.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per phase and round")
    parser.add_argument("--rounds", type=int, default=10, help="alternations of the two phases per job")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per framework and rank count")
    parser.add_argument("--transport", default=None, help="distprop's DataParallel transport (default: automatic)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DDP reference")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for each job")


def _environment() -> dict:
    env = job_environment(OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, MKL_NUM_THREADS=1)
    for name in BLAS_SLOWDOWN_VARS:
        env.pop(name, None)
    return env


def _worker(framework: str, args) -> list[str]:
    worker = [sys.executable, "-m", WORKER, framework, "--batch", str(args.batch), "--steps", str(args.steps),
              "--rounds", str(args.rounds)]
    if framework == "distprop" and args.transport:
        worker += ["--transport", args.transport]
    return worker


def _start_distprop(ranks: int, args, env: dict, stdout, stderr) -> list[subprocess.Popen]:
    """mpiexec without binding, as `distprop launch` runs jobs (Open MPI would bind each
    of 2 ranks to a core; PyTorch's ranks are not bound either)."""
    command = mpiexec_command(ranks, _worker("distprop", args))
    if is_open_mpi(command[0]):
        command[1:1] = ["--bind-to", "none"]
    return [subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)]


def _start_torch(ranks: int, args, env: dict, stdout, stderr) -> list[subprocess.Popen]:
    """PyTorch's ranks, started here with its env:// rendezvous variables rather than
    by torchrun: torchrun starts each rank in a session of its own, and where the
    kernel groups processes by session for scheduling (CONFIG_SCHED_AUTOGROUP, on
    by default in most distributions) each session gets an equal share of the CPU.
    On a machine with other load, torchrun's 2 ranks then got two shares where
    mpiexec's (in the caller's session) got one: 1.6x distprop's compute
    throughput with no communication, for the same arithmetic. Started here, both
    frameworks' ranks share this process's session."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(ranks),
                  "LOCAL_WORLD_SIZE": str(ranks)}
    return [subprocess.Popen(_worker("torch", args), stdout=stdout if rank == 0 else subprocess.DEVNULL,
                             stderr=stderr, env={**env, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in range(ranks)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _job(framework: str, ranks: int, args) -> dict:
    """{'throughput': samples/s with communication, 'baseline': samples/s without}."""
    start = _start_distprop if framework == "distprop" else _start_torch
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        processes = start(ranks, args, _environment(), stdout, stderr)
        codes = _wait_all(processes, args.timeout)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    figures = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if name in ("throughput", "baseline"):
            figures[name] = float(value)
    if any(codes) or len(figures) != 2:
        raise RuntimeError(f"{framework} with {ranks} ranks failed (exit statuses {codes}):\n{err[-2000:]}")
    return figures


def _wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit statuses; past the deadline every process still running is killed and the
    job is reported as timed out."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.wait()
        raise RuntimeError(f"a benchmark job did not finish within --timeout {timeout:g} s") from None
    return [process.returncode for process in processes]


def _rank_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--ranks: expected comma-separated integers, got {text!r}") from None
    if not counts or counts[0] < 2:
        raise UserError(f"--ranks: rank counts compared with 1 rank must be at least 2, got {text!r}")
    return counts


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def run(args) -> int:
    counts = [1] + _rank_counts(args.ranks)
    frameworks = ["distprop"]
    if args.no_torch:
        pass
    elif importlib.util.find_spec("torch") is not None:
        frameworks.append("torch")
    else:
        print("torch is not installed: no PyTorch DDP reference")
    print(environment_note())
    print(f"MLP 784-1024-1024-10, batch {args.batch} per rank, 1 thread per rank, {os.cpu_count()} cores; "
          f"{args.rounds} rounds of {args.steps} steps per phase and job, {args.repeats} jobs each")
    jobs = {(f, r): [] for f in frameworks for r in counts}
    for _ in range(args.repeats):  # interleaved: load from elsewhere falls on every configuration alike
        for ranks in counts:
            for framework in frameworks:
                jobs[framework, ranks].append(_job(framework, ranks, args))
    print(f"{'framework':10} {'ranks':>5} {'samples/s':>10} {'baseline/s':>10} "
          f"{'vs baseline (range)':>22} {'efficiency (range)':>22}")
    for framework in frameworks:
        one = statistics.median(job["throughput"] for job in jobs[framework, 1])
        for ranks in counts:
            runs = jobs[framework, ranks]
            versus = [job["throughput"] / job["baseline"] for job in runs]
            efficiency = [job["throughput"] / (ranks * one) for job in runs]
            print(f"{framework:10} {ranks:5d} {statistics.median(j['throughput'] for j in runs):10.0f} "
                  f"{statistics.median(j['baseline'] for j in runs):10.0f} {_summary(versus):>22} "
                  f"{_summary(efficiency):>22}")
    if "torch" in frameworks:
        for ranks in counts[1:]:
            pairs = list(zip(jobs["distprop", ranks], jobs["torch", ranks]))
            ratios = [ours["throughput"] / theirs["throughput"] for ours, theirs in pairs]
            # The ratio is the product of how fast each computes (their no-communication
            # baselines) and how little each loses to the exchange (each against its own).
            computing = [ours["baseline"] / theirs["baseline"] for ours, theirs in pairs]
            exchanging = [r / c for r, c in zip(ratios, computing)]
            print(f"distprop / PyTorch DDP at {ranks} ranks: {_summary(ratios)} (jobs run back to back)\n"
                  f"  = computing {_summary(computing)} (the no-communication baselines) "
                  f"x exchanging {_summary(exchanging)} (each against its baseline)")
    print("targets: distprop vs baseline >= 0.95 at 2 and 3 ranks; >= 1.3x PyTorch DDP at 2 ranks")
    return 0
