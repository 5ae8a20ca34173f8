"""Timing helpers shared by the benchmarks: warm-up, repeats, robust statistics."""

from __future__ import annotations

import os
import statistics
import sys
import time

# The machine may set these; they slow numpy's OpenBLAS. Benchmarks drop them from
# their own environment (tests never do) and say so in their output.
BLAS_SLOWDOWN_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def reexec_without_blas_overrides(argv) -> None:
    """Restart this process without BLAS_SLOWDOWN_VARS if any is set: BLAS reads
    them when it loads, so they cannot be dropped from a running process."""
    present = [v for v in BLAS_SLOWDOWN_VARS if v in os.environ]
    if not present:
        return
    env = {k: v for k, v in os.environ.items() if k not in BLAS_SLOWDOWN_VARS}
    env["DISTPROP_BENCH_UNSET"] = ",".join(present)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "distprop", *argv], env)


def environment_note() -> str:
    unset = os.environ.get("DISTPROP_BENCH_UNSET")
    if unset:
        return f"note: {unset} removed from this benchmark's environment (they slow numpy's BLAS)"
    return "note: " + ", ".join(BLAS_SLOWDOWN_VARS) + " not set"


def measure(function, repeats: int = 20, warmup: int = 3, min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of `function`, one sample per call, after warm-up calls."""
    for _ in range(warmup):
        function()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        function()
        samples.append(time.perf_counter() - t)
    return samples


def median(samples) -> float:
    return statistics.median(samples)


def interleaved(functions: dict, rounds: int = 5, repeats: int = 5, warmup: int = 2) -> dict:
    """Median seconds per call of each function, measured in alternating rounds so
    that a noisy neighbour slows all of them alike."""
    for f in functions.values():
        for _ in range(warmup):
            f()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, f in functions.items():
            samples[name] += measure(f, repeats=repeats, warmup=0)
    return {name: median(s) for name, s in samples.items()}
