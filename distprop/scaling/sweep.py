"""`distprop scale --ranks 1,2,4 --out DIR`: the same training job at each rank count.

Each run is `distprop train` started by `distprop launch` (on this machine, across
the hosts of --hostfile/--hosts, or inside a Slurm allocation, as distprop launch
decides), for --steps steps of which the first --warmup are left out of the
timings. Every rank count also gets the no-communication baseline: the same
ranks, each training on its own with no gradient exchange (scaling.independent).
Runs are repeated --repeats times, rank counts interleaved, and medians reported.

Per rank count:
- throughput: samples per second over all ranks (train's summary: the per-step
  mean over ranks after the warm-up steps);
- the step broken into data wait, forward, backward, communication not hidden by
  backward, optimizer (ms per step, the slowest rank's means);
- efficiency = throughput / (ranks x the smallest count's throughput per rank);
- the baseline's throughput (the sum of its ranks') and efficiency on the same
  footing: the machine's own limit for that many ranks.

Weak mode keeps --batch-size per rank; strong mode keeps the global batch and
divides it among the ranks. Writes DIR/scaling.csv (one row per run),
DIR/scaling.json (medians, the machine, library versions, the command) and
DIR/scaling.png; --compare OTHER overlays another sweep's scaling.json.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import statistics
import sys
import time

from distprop.errors import UserError
from distprop.scaling import jobs
from distprop.scaling.predict import parse_ranks

PHASES = ("data_wait", "forward", "backward", "comm_wait", "optimizer")
DEFAULT_BATCH = 32


def per_rank_batches(counts, mode: str, batch: int) -> dict[int, int]:
    if mode == "weak":
        return {k: batch for k in counts}
    indivisible = [k for k in counts if batch % k]
    if indivisible:
        raise UserError(f"--mode strong: the global batch {batch} does not divide among {indivisible[0]} ranks; "
                        "choose a --batch-size every rank count divides")
    return {k: batch // k for k in counts}


def threads_for(ranks: int, args) -> int:
    if args.threads is not None:
        return args.threads
    on_this_node = ranks if not (args.hostfile or args.hosts) else 1
    return max(1, (os.cpu_count() or 1) // on_this_node)


def train_flags(args, data: str, batch: int, threads: int, out: str) -> list[str]:
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else list(args.train_args)
    return ["--model", args.train_model, "--data", data, "--batch-size", str(batch), "--steps", str(args.steps),
            "--timing-warmup", str(args.warmup), "--threads", str(threads), "--progress", "none",
            "--eval-every", "0", "--out", out, *extra]


def read_summary(path: str) -> dict:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise UserError(f"no readable summary at {path}: {error}") from None


def run_sync(ranks: int, batch: int, threads: int, data: str, out: str, args) -> dict:
    program = [sys.executable, "-m", "distprop", "train", *train_flags(args, data, batch, threads, out)]
    jobs.run(jobs.launch_command(ranks, program, args), f"distprop train on {ranks} rank(s)", args.timeout)
    summary = read_summary(os.path.join(out, "summary.json"))
    return {"throughput": summary["samples_per_s"], "step_ms": summary["phases"]["step_s"]["max"] * 1e3,
            "phases_ms": {p: summary["phases"][f"{p}_s"]["max"] * 1e3 for p in PHASES}}


def run_baseline(ranks: int, batch: int, threads: int, data: str, out: str, args) -> dict:
    program = [sys.executable, "-m", "distprop.scaling.independent", "--threads", str(threads), "--",
               *train_flags(args, data, batch, threads, out)]
    jobs.run(jobs.launch_command(ranks, program, args), f"the {ranks}-rank no-communication baseline", args.timeout)
    summaries = [read_summary(os.path.join(out, f"rank-{r}", "summary.json")) for r in range(ranks)]
    return {"throughput": sum(s["samples_per_s"] for s in summaries),
            "step_ms": max(s["phases"]["step_s"]["max"] for s in summaries) * 1e3}


def prepare_data(args) -> str:
    if args.data is not None:
        return os.path.abspath(args.data)
    from distprop.train.data import write_digits_once

    directory = os.path.abspath(os.path.join(args.out, "data", "digits"))
    write_digits_once(directory)
    return directory


def versions() -> dict:
    import numpy

    import distprop

    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "distprop": getattr(distprop, "__version__", "unknown")}
    try:
        import mpi4py
        from mpi4py import MPI

        found["mpi4py"] = mpi4py.__version__
        found["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except ImportError:
        pass
    return found


def run(args) -> int:
    from distprop.scaling.calibrate import machine

    counts = parse_ranks(args.ranks or "1,2,4")
    batches = per_rank_batches(counts, args.mode, args.batch_size or DEFAULT_BATCH)
    compare = _load_sweep(args.compare) if args.compare else None
    os.makedirs(args.out, exist_ok=True)
    data = prepare_data(args)
    runs = []
    started = time.time()
    for repeat in range(args.repeats):
        for ranks in counts:
            threads = threads_for(ranks, args)
            where = os.path.join(args.out, "runs", f"{ranks}-ranks-{repeat}")
            kinds = [("sync", run_sync)] + ([] if args.no_baseline else [("baseline", run_baseline)])
            for kind, runner in kinds:
                run_dir = where + ("-baseline" if kind == "baseline" else "")
                shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts afresh, never resumes
                result = runner(ranks, batches[ranks], threads, data, run_dir, args)
                runs.append({"ranks": ranks, "repeat": repeat, "kind": kind, "per_rank_batch": batches[ranks],
                             "threads": threads, **result})
                print(f"{ranks} rank(s), run {repeat + 1}/{args.repeats}, {kind}: "
                      f"{result['throughput']:.0f} samples/s", flush=True)
    results = aggregate(runs, counts)
    summary = {"label": args.label or os.path.basename(os.path.abspath(args.out)), "mode": args.mode,
               "title": f"distprop scale: {args.train_model} on {os.path.basename(data)}, {args.mode} scaling",
               "command": ["distprop", *getattr(args, "_argv", [])], "machine": machine(),
               "versions": versions(), "hosts": args.hostfile or args.hosts or "this machine",
               "unit": "samples", "phases": list(PHASES), "steps": args.steps, "warmup": args.warmup,
               "repeats": args.repeats, "seconds": time.time() - started, "results": results}
    write_outputs(args.out, runs, summary, compare)
    print_results(summary)
    return 0


def aggregate(runs, counts) -> list[dict]:
    results, base = [], None
    for ranks in counts:
        sync = [r for r in runs if r["ranks"] == ranks and r["kind"] == "sync"]
        baseline = [r for r in runs if r["ranks"] == ranks and r["kind"] == "baseline"]
        throughput = statistics.median(r["throughput"] for r in sync)
        if base is None:
            base = throughput / ranks  # per rank, at the smallest count
        row = {"ranks": ranks, "per_rank_batch": sync[0]["per_rank_batch"], "throughput": throughput,
               "throughput_range": [min(r["throughput"] for r in sync), max(r["throughput"] for r in sync)],
               "efficiency": throughput / (ranks * base),
               "step_ms": statistics.median(r["step_ms"] for r in sync),
               "phases_ms": {p: statistics.median(r["phases_ms"][p] for r in sync) for p in PHASES}}
        if baseline:
            row["baseline_throughput"] = statistics.median(r["throughput"] for r in baseline)
            row["baseline_efficiency"] = row["baseline_throughput"] / (ranks * base)
            row["versus_baseline"] = throughput / row["baseline_throughput"]
        results.append(row)
    return results


def write_outputs(out: str, runs, summary: dict, compare) -> None:
    with open(os.path.join(out, "scaling.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["ranks", "repeat", "kind", "per_rank_batch", "threads", "samples_per_s", "step_ms",
                         *[f"{p}_ms" for p in PHASES]])
        for r in runs:
            phases = r.get("phases_ms", {})
            writer.writerow([r["ranks"], r["repeat"], r["kind"], r["per_rank_batch"], r["threads"],
                             f"{r['throughput']:.2f}", f"{r['step_ms']:.4f}",
                             *[f"{phases[p]:.4f}" if p in phases else "" for p in PHASES]])
    with open(os.path.join(out, "scaling.json"), "w") as file:
        json.dump(summary, file, indent=1)
    from distprop.scaling import plots

    plots.plot_sweep(summary, os.path.join(out, "scaling.png"), compare)


def _load_sweep(directory: str) -> dict:
    path = os.path.join(directory, "scaling.json")
    try:
        with open(path) as file:
            sweep = json.load(file)
    except (OSError, ValueError) as error:
        raise UserError(f"--compare: cannot read {path}: {error}") from None
    if "results" not in sweep:
        raise UserError(f"--compare: {path} is not a distprop scale sweep")
    return sweep


def print_results(summary: dict) -> None:
    print(f"{'ranks':>5} {'batch/rank':>10} {'samples/s':>10} {'efficiency':>10} {'baseline/s':>10} "
          f"{'base eff':>8} {'vs base':>7}  ms per step: " + " ".join(f"{p:>9}" for p in PHASES))
    for row in summary["results"]:
        baseline = (f"{row['baseline_throughput']:10.0f} {row['baseline_efficiency']:8.3f} "
                    f"{row['versus_baseline']:7.3f}" if "baseline_throughput" in row else f"{'':10} {'':8} {'':7}")
        print(f"{row['ranks']:5d} {row['per_rank_batch']:10d} {row['throughput']:10.0f} {row['efficiency']:10.3f} "
              f"{baseline}               " + " ".join(f"{row['phases_ms'][p]:9.2f}" for p in PHASES))
