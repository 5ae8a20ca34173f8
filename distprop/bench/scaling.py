"""`distprop bench scaling`: weak scaling of the MLP 784-1024-1024-10 on this machine.

Each rank keeps a batch of 256 samples and one thread. For each rank count the
job alternates between training with gradient averaging and the same ranks
training with no communication at all (the no-communication baseline: what this
machine allows that many ranks, since they share its cores and memory bandwidth);
see scaling_worker. Reported per rank count:
- "vs baseline": throughput / the baseline of the same job: what communication costs;
- "efficiency": throughput / (ranks * the 1-rank throughput): against linear.
PyTorch's DistributedDataParallel (gloo backend, started by torchrun) runs the same
model and measurement as the reference; jobs alternate between the two frameworks
and are repeated, and the medians are reported with their ranges.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys

from distprop.bench.timing import BLAS_SLOWDOWN_VARS, environment_note
from distprop.errors import UserError
from distprop.launcher import job_environment, mpiexec_command

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


def _command(framework: str, ranks: int, args) -> list[str]:
    worker = ["-m", WORKER, framework, "--batch", str(args.batch), "--steps", str(args.steps),
              "--rounds", str(args.rounds)]
    if framework == "distprop":
        if args.transport:
            worker += ["--transport", args.transport]
        return mpiexec_command(ranks, [sys.executable, *worker])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker]


def _job(framework: str, ranks: int, args) -> dict:
    """{'throughput': samples/s with communication, 'baseline': samples/s without}."""
    result = subprocess.run(_command(framework, ranks, args), capture_output=True, text=True,
                            timeout=args.timeout, env=_environment())
    figures = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name in ("throughput", "baseline"):
            figures[name] = float(value)
    if result.returncode != 0 or len(figures) != 2:
        raise RuntimeError(f"{framework} with {ranks} ranks failed (exit {result.returncode}):\n"
                           f"{result.stderr[-2000:]}")
    return figures


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
            ratios = [ours["throughput"] / theirs["throughput"]
                      for ours, theirs in zip(jobs["distprop", ranks], jobs["torch", ranks])]
            print(f"distprop / PyTorch DDP at {ranks} ranks: {_summary(ratios)} (jobs run back to back)")
    print("targets: distprop vs baseline >= 0.95 at 2 and 3 ranks; >= 1.3x PyTorch DDP at 2 ranks")
    return 0
