"""`distprop scale --calibrate` and `--validate`: the cost model against this machine.

--calibrate runs distprop.scaling.calibrate as a job (2 ranks unless --ranks says
otherwise) and keeps its measurements in DIR/calibration.json.

Both run on this machine, or with --hostfile/--hosts across hosts through
distprop launch (one rank per host: MPI between them, e.g. over TCP).

--validate fits the model on a 2-rank job -- the transports' alpha and beta, the
workload's phases and gradient readiness, all measured by that job -- and predicts
the synchronised step at 1, 2 and 3 ranks (3 ranks: more ranks than this machine
has cores, and a node-local reduction among three). Jobs at 1 and 3 ranks then
measure it, alternating with steps that do not communicate. DIR/validation.json
holds inputs, predictions, measurements and errors. The environment is left as
it is (BLAS variables included): fit and measurement see the same machine.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from distprop.errors import UserError
from distprop.scaling import fabrics, jobs, workloads
from distprop.scaling.model import predict

CALIBRATE = "distprop.scaling.calibrate"


def calibration_job(ranks: int, out: str, args, extra=()) -> dict:
    """Run the calibration program on `ranks` ranks; its JSON."""
    program = [sys.executable, "-m", CALIBRATE, "--out", os.path.abspath(out), "--rounds", str(args.rounds), *extra]
    jobs.run(jobs.launch_command(ranks, program, args), f"the {ranks}-rank calibration job", args.timeout)
    with open(out) as file:
        return json.load(file)


def run_calibrate(args) -> int:
    from distprop.scaling.predict import parse_ranks

    ranks = parse_ranks(args.ranks)[0] if args.ranks else 2
    if ranks < 2:
        raise UserError("--calibrate measures communication: --ranks must be at least 2")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "calibration.json")
    calibration = calibration_job(ranks, path, args)
    single = calibration_job(1, os.path.join(args.out, "single-rank.json"), args, ["--transports", ""])
    calibration["single_rank_step_s"] = single["workload"]["baseline_step_s"]
    with open(path, "w") as file:
        json.dump(calibration, file, indent=1)
    print(describe_calibration(calibration))
    print(f"wrote {path}")
    return 0


def describe_calibration(calibration: dict) -> str:
    lines = [f"{calibration['ranks']} ranks, {calibration['machine']['cores']} cores, "
             f"{calibration['threads_per_rank']} thread(s) per rank"]
    for name, fit in calibration["transports"].items():
        lines.append(f"  {name:4} ({fit['transport']}): alpha {fit['alpha'] * 1e6:.1f} us, "
                     f"1/beta {1 / fit['beta'] / 1e9 if fit['beta'] else float('inf'):.2f} GB/s per bucket")
        if "beta_note" in fit:
            lines.append(f"    {fit['beta_note']}")
    w = calibration["workload"]
    lines.append(f"  {w['description']}: forward {w['forward_s'] * 1e3:.2f} ms, backward "
                 f"{w['backward_s'] * 1e3:.2f} ms, optimizer {w['optimizer_s'] * 1e3:.2f} ms, step with no "
                 f"communication {w['baseline_step_s'] * 1e3:.2f} ms, synchronised {w['sync_step_s'] * 1e3:.2f} ms")
    return "\n".join(lines)


def workload_of(calibration: dict):
    """The measured workload, with what the step spends outside its timed phases
    (zero_grad, Python between phases) counted so that it adds up to the measured
    step without communication."""
    from dataclasses import replace

    workload = workloads.from_calibration(calibration)
    w = calibration["workload"]
    rest = max(0.0, w["baseline_step_s"] - w["forward_s"] - w["backward_s"] - w["optimizer_s"])
    return replace(workload, data_s=rest)


def predicted_steps(calibration: dict, ranks) -> tuple[dict[int, float], float]:
    """The step at each rank count, and the contention factor fitted on the
    calibration's own synchronised step (communication inside a step against the
    transports timed alone)."""
    workload = workload_of(calibration)
    host, fabric = fabrics.measured_host(calibration), fabrics.shm_fabric(calibration)
    fitted = predict(workload, fabric, "hier", calibration["ranks"], host=host)
    paid = calibration["workload"]["sync_step_s"] - (fitted.step_s - fitted.exposed_s)
    contention = max(paid / fitted.exposed_s, 0.0) if fitted.exposed_s > 0 else 1.0
    return {p: predict(workload, fabric, "hier", p, host=host, contention=contention).step_s
            for p in ranks}, contention


def run_validate(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    repeats = max(1, args.repeats)
    fits, measured = [], {1: [], 2: [], 3: []}
    predicted_ranks = (2, 3)
    for i in range(repeats):  # interleaved: load from elsewhere falls on every rank count alike
        fit = calibration_job(2, os.path.join(args.out, f"fit-2-ranks-{i}.json"), args)
        fits.append(fit)
        measured[2].append(fit["workload"]["sync_step_s"])
        for ranks in (1, 3):
            job = calibration_job(ranks, os.path.join(args.out, f"measure-{ranks}-ranks-{i}.json"), args,
                                  ["--transports", ""])
            measured[ranks].append(job["workload"]["sync_step_s"])
    rows = []
    for i, fit in enumerate(fits):
        fit["single_rank_step_s"] = measured[1][i]
        steps, contention = predicted_steps(fit, predicted_ranks)
        for ranks, step in steps.items():
            rows.append({"repeat": i, "ranks": ranks, "contention": contention, "predicted_step_s": step,
                         "measured_step_s": measured[ranks][i], "error": step / measured[ranks][i] - 1})
    print(describe_calibration(fits[0]))
    print(f"1 rank alone: {statistics.median(measured[1]) * 1e3:.2f} ms per step; communication inside a step "
          f"takes {statistics.median(r['contention'] for r in rows):.2f}x its time alone (fitted at 2 ranks)")
    print(f"{'ranks':>5} {'predicted ms':>12} {'measured ms':>11} {'error':>7} {'efficiency pred/meas':>21}"
          f"   (fitted on 2 ranks; {repeats} repeat(s), medians)")
    summary = {}
    for ranks in predicted_ranks:
        mine = [r for r in rows if r["ranks"] == ranks]
        predicted = statistics.median(r["predicted_step_s"] for r in mine)
        actual = statistics.median(r["measured_step_s"] for r in mine)
        errors = [r["error"] for r in mine]
        summary[ranks] = {"predicted_step_s": predicted, "measured_step_s": actual,
                          "error": statistics.median(errors), "errors": errors,
                          "measured_efficiency": statistics.median(measured[1]) / actual,
                          "predicted_efficiency": statistics.median(measured[1]) / predicted}
        print(f"{ranks:5d} {predicted * 1e3:12.2f} {actual * 1e3:11.2f} {statistics.median(errors):+7.1%} "
              f"{summary[ranks]['predicted_efficiency']:10.3f}/{summary[ranks]['measured_efficiency']:.3f}"
              + (f"   (range {min(errors):+.1%} to {max(errors):+.1%})" if len(errors) > 1 else ""))
    path = os.path.join(args.out, "validation.json")
    with open(path, "w") as file:
        json.dump({"command": getattr(args, "_argv", None), "rows": rows, "summary": summary,
                   "machine": fits[0]["machine"]}, file, indent=1)
    print(f"wrote {path}")
    return 0
