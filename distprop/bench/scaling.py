"""`distprop bench scaling`: weak scaling of the MLP 784-1024-1024-10 on this machine.

Each rank keeps a batch of 256 samples and one thread; the job runs with 1 rank
and with N ranks, and efficiency = throughput(N) / (N * throughput(1)). PyTorch's
DistributedDataParallel (gloo backend, started by torchrun) runs the same model in
the same invocation as the reference. Runs alternate between the two frameworks
and are repeated; the medians are reported.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys

from distprop.bench.timing import BLAS_SLOWDOWN_VARS, environment_note
from distprop.launcher import job_environment, mpiexec_command

WORKER = "distprop.bench.scaling_worker"


def configure(parser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="the N compared with 1 rank")
    parser.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for each job")


def _environment() -> dict:
    env = job_environment(OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, MKL_NUM_THREADS=1)
    for name in BLAS_SLOWDOWN_VARS:
        env.pop(name, None)
    return env


def _command(framework: str, ranks: int, args) -> list[str]:
    worker = ["-m", WORKER, framework, "--batch", str(args.batch), "--steps", str(args.steps)]
    if framework == "distprop":
        return mpiexec_command(ranks, [sys.executable, *worker])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker]


def _throughput(framework: str, ranks: int, args) -> float:
    result = subprocess.run(_command(framework, ranks, args), capture_output=True, text=True,
                            timeout=args.timeout, env=_environment())
    for line in result.stdout.splitlines():
        if line.startswith("throughput "):
            return float(line.split()[1])
    raise RuntimeError(f"{framework} with {ranks} ranks failed (exit {result.returncode}):\n"
                       f"{result.stderr[-2000:]}")


def run(args) -> int:
    frameworks = ["distprop"]
    if importlib.util.find_spec("torch") is not None:
        frameworks.append("torch")
    else:
        print("torch is not installed: no PyTorch DDP reference")
    print(environment_note())
    print(f"MLP 784-1024-1024-10, batch {args.batch} per rank, 1 thread per rank, {args.steps} timed steps, "
          f"median of {args.repeats} runs")
    samples = {(f, r): [] for f in frameworks for r in (1, args.ranks)}
    for _ in range(args.repeats):
        for ranks in (1, args.ranks):
            for framework in frameworks:
                samples[framework, ranks].append(_throughput(framework, ranks, args))
    print(f"{'framework':10} {'1 rank':>12} {f'{args.ranks} ranks':>12} {'efficiency':>10}")
    for framework in frameworks:
        one = statistics.median(samples[framework, 1])
        many = statistics.median(samples[framework, args.ranks])
        efficiency = many / (args.ranks * one)
        print(f"{framework:10} {one:10.0f}/s {many:10.0f}/s {efficiency:10.3f}")
    print("target: distprop efficiency >= 0.95")
    return 0
