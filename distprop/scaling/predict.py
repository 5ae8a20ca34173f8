"""`distprop scale --predict`: step time and efficiency at 8 to 1024 ranks.

For each model x fabric x algorithm it prints, per rank count: the compute time,
the sum of the buckets' allreduce times, the communication the step waits for,
the step, the efficiency against one rank, the throughput, and the rank count
from which the allreduce's latency terms outweigh its bandwidth terms. Beside the
table: the published figures nearest to the setup (keep in mind what they include
that the model does not: input pipelines, stragglers, congestion).
"""

from __future__ import annotations

import json
import os

from distprop.errors import UserError
from distprop.scaling import fabrics, workloads
from distprop.scaling.allreduce import ALGORITHMS, latency_crossover
from distprop.scaling.model import MB, make_buckets, predict

DEFAULT_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)


def parse_list(text: str, what: str, choices=None) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise UserError(f"{what}: empty list")
    for item in items:
        if choices is not None and item not in choices:
            raise UserError(f"{what}: unknown value {item!r}; choose from {', '.join(choices)}")
    return items


def parse_ranks(text: str, what: str = "--ranks") -> list[int]:
    values = []
    for part in parse_list(text, what):
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"{what}: expected positive integers separated by commas, got {part!r}")
        values.append(int(part))
    return sorted(set(values))


def load_calibration(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as file:
            calibration = json.load(file)
    except FileNotFoundError:
        raise UserError(f"--calibration: {path} does not exist (write one with --calibrate)") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--calibration: cannot read {path}: {error}") from None
    for key in ("transports", "workload", "machine", "ranks"):
        if key not in calibration:
            raise UserError(f"--calibration: {path} has no '{key}': not written by distprop scale --calibrate")
    return calibration


def rows(workload, fabric, algorithm: str, ranks, args, host=None) -> list[dict]:
    buckets = None  # the measured workload's own, unless --bucket-mb asks for others
    if args.bucket_mb is not None or workload.buckets is None:
        cap = args.bucket_mb or 25.0
        buckets = make_buckets(workload.gradients, cap * MB, min(1.0, cap) * MB)
    table = []
    for p in ranks:
        result = predict(workload, fabric, algorithm, p, buckets=buckets, kappa=args.kappa, sigma=args.sigma,
                         host=host)
        table.append({"model": workload.name, "fabric": fabric.name, "algorithm": algorithm, "ranks": p,
                      "compute_ms": result.compute_s * 1e3, "allreduce_ms": result.allreduce_s * 1e3,
                      "exposed_ms": result.exposed_s * 1e3, "step_ms": result.step_s * 1e3,
                      "efficiency": result.efficiency, "throughput": result.throughput, "unit": workload.unit,
                      "buckets": result.buckets})
    return table


def run(args) -> int:
    calibration = load_calibration(args.calibration)
    ranks = parse_ranks(args.ranks) if args.ranks else list(DEFAULT_RANKS)
    models = parse_list(args.model or "resnet50,gpt2-small", "--model",
                        list(workloads.REFERENCES) + ["measured"])
    names = parse_list(args.fabric or "ib-200", "--fabric", fabrics.NAMES)
    algorithms = parse_list(args.algorithm or "hier", "--algorithm", list(ALGORITHMS))
    host = None
    everything = []
    for model_name in models:
        if model_name == "measured":
            if calibration is None:
                raise UserError("--model measured needs --calibration FILE (from distprop scale --calibrate)")
            workload = workloads.from_calibration(calibration)
            host = fabrics.measured_host(calibration)
        else:
            workload, host = workloads.reference(model_name), None
        print(f"{workload.description}\n  compute {workload.compute_s * 1e3:.1f} ms per step "
              f"({workload.source}); gradients {workload.gradient_bytes / 1e6:.1f} MB")
        for name in names:
            fabric = fabrics.preset(name, ranks_per_node=args.ranks_per_node, nics=args.nics,
                                    calibration=calibration)
            for algorithm in algorithms:
                table = rows(workload, fabric, algorithm, ranks, args, host)
                everything += table
                crossover = latency_crossover(algorithm, workload.gradient_bytes, fabric, ranks)
                _print_table(fabric, algorithm, table, crossover)
        _print_published(names)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prediction.json"), "w") as file:
            json.dump({"command": getattr(args, "_argv", None), "rows": everything}, file, indent=1)
        from distprop.scaling import plots

        path = plots.plot_prediction(everything, os.path.join(args.out, "prediction.png"))
        print(f"wrote {os.path.join(args.out, 'prediction.json')}" + (f" and {path}" if path else ""))
    return 0


def _print_table(fabric, algorithm: str, table, crossover) -> None:
    print(f"\n  {fabric.name}: {fabric.description}; algorithm {algorithm}"
          f"\n  ({fabric.source})")
    print(f"  {'ranks':>6} {'compute ms':>10} {'allreduce ms':>12} {'exposed ms':>10} {'step ms':>9} "
          f"{'efficiency':>10} {'throughput':>12}")
    for row in table:
        print(f"  {row['ranks']:6d} {row['compute_ms']:10.1f} {row['allreduce_ms']:12.1f} {row['exposed_ms']:10.1f} "
              f"{row['step_ms']:9.1f} {row['efficiency']:10.1%} {row['throughput']:12.0f} {row['unit']}/s")
    if crossover is not None:
        print(f"  from {crossover} ranks the allreduce's latency terms exceed its bandwidth terms")


def _print_published(names) -> None:
    relevant = [p for p in workloads.PUBLISHED if p[3] in names]
    if relevant:
        print("\n  published, for comparison (their setups differ; the model omits input, stragglers, congestion):")
        for who, what, setup, _, _, _ in relevant:
            print(f"    {who}: {what} ({setup})")
    print()
