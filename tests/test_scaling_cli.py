"""`distprop scale` end to end: predictions against the model called directly, a
sweep and the lr-scaling experiment in small (real jobs through distprop launch),
the model fitted on 2 ranks here and held against a 3-rank job, and one-line
errors for bad input. Every command runs with a hard timeout."""

import csv
import json
import subprocess
import sys

import pytest

from distprop.launcher import find_mpiexec, job_environment

needs_mpi = pytest.mark.skipif(find_mpiexec() is None, reason="needs an MPI runtime (mpiexec)")


def scale(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "distprop", "scale", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=job_environment(PYTHONUNBUFFERED=1))


def test_predict_prints_and_writes_what_the_model_gives(tmp_path):
    from distprop.scaling import fabrics, workloads
    from distprop.scaling.model import predict

    result = scale("--predict", "--ranks", "8,64,512", "--fabric", "ib-200,eth-25", "--algorithm", "ring,hier",
                   "--model", "resnet50", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Horovod" in result.stdout and "Goyal" in result.stdout  # published figures beside the table
    rows = json.loads((tmp_path / "prediction.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 3
    row = next(r for r in rows if (r["fabric"], r["algorithm"], r["ranks"]) == ("eth-25", "ring", 64))
    direct = predict(workloads.reference("resnet50"), fabrics.preset("eth-25"), "ring", 64)
    assert row["step_ms"] == pytest.approx(direct.step_s * 1e3)
    assert row["efficiency"] == pytest.approx(direct.efficiency)
    assert f"{row['efficiency']:.1%}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--predict", "--fabric", "ib-9"], "--fabric: unknown value 'ib-9'"),
    (["--predict", "--ranks", "8,0"], "--ranks: expected positive integers"),
    (["--predict", "--model", "vgg"], "--model: unknown value 'vgg'"),
    (["--predict", "--model", "measured"], "--model measured needs --calibration"),
    (["--predict", "--calibration", "/nonexistent.json"], "/nonexistent.json does not exist"),
    (["--ranks", "1,2"], "--out DIR is needed"),
    (["--validate", "--rounds", "0", "--out", "OUT"], "--rounds must be at least 1, got 0"),
    (["--ranks", "1,2,3", "--mode", "strong", "--batch-size", "32", "--out", "OUT"],
     "the global batch 32 does not divide among 3 ranks"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = scale(*[str(tmp_path / "out") if a == "OUT" else a for a in args], timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@needs_mpi
@pytest.mark.slow
def test_sweep_writes_runs_medians_and_the_no_communication_baseline(tmp_path):
    out = tmp_path / "sweep"
    result = scale("--ranks", "1,2", "--steps", 12, "--warmup", 2, "--repeats", 1, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "scaling.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["ranks"], r["kind"]) for r in rows] == [("1", "sync"), ("1", "baseline"), ("2", "sync"),
                                                         ("2", "baseline")]
    summary = json.loads((out / "scaling.json").read_text())
    for key in ("machine", "versions", "command", "results", "phases"):
        assert key in summary
    one, two = summary["results"]
    assert one["efficiency"] == pytest.approx(1.0)
    assert two["efficiency"] == pytest.approx(two["throughput"] / (2 * one["throughput"]))
    assert two["versus_baseline"] == pytest.approx(two["throughput"] / two["baseline_throughput"])
    assert set(two["phases_ms"]) == {"data_wait", "forward", "backward", "comm_wait", "optimizer"}
    assert two["phases_ms"]["comm_wait"] > 0 and one["phases_ms"]["comm_wait"] == 0
    # the baseline's ranks trained as one-rank jobs; the sweep's as one job of two
    baseline = json.loads((out / "runs" / "2-ranks-0-baseline" / "rank-1" / "summary.json").read_text())
    synced = json.loads((out / "runs" / "2-ranks-0" / "summary.json").read_text())
    assert baseline["world_size"] == 1 and synced["world_size"] == 2
    assert baseline["per_rank_batch"] == synced["per_rank_batch"] == 32


@needs_mpi
@pytest.mark.slow
def test_strong_scaling_divides_the_global_batch(tmp_path):
    out = tmp_path / "strong"
    result = scale("--ranks", "1,2", "--mode", "strong", "--batch-size", 64, "--steps", 6, "--warmup", 1,
                   "--repeats", 1, "--no-baseline", "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "scaling.json").read_text())["results"]
    assert [r["per_rank_batch"] for r in results] == [64, 32]


def test_sweep_figure_overlays_another_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    from distprop.scaling import plots

    def sweep(label, scale_by):
        phases = {p: 1.0 for p in ("data_wait", "forward", "backward", "comm_wait", "optimizer")}
        return {"label": label, "phases": list(phases), "results": [
            {"ranks": k, "throughput": 100.0 * k * scale_by, "efficiency": scale_by, "phases_ms": phases,
             "baseline_throughput": 100.0 * k, "baseline_efficiency": 1.0} for k in (1, 2, 4)]}

    path = plots.plot_sweep(sweep("a", 0.9), str(tmp_path / "scaling.png"), compare=sweep("b", 0.8))
    assert path and (tmp_path / "scaling.png").stat().st_size > 10_000


@needs_mpi
@pytest.mark.slow
def test_lr_scaling_in_small_keeps_two_ranks_near_one(tmp_path):
    out = tmp_path / "lr"
    result = scale("--experiment", "lr-scaling", "--ranks", "1,2", "--epochs", 6, "--repeats", 1, "--out", out,
                   timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "lr_scaling.json").read_text())["table"]
    one, two = table
    assert (one["global_batch"], two["global_batch"]) == (32, 64) and two["steps"] * 2 == one["steps"]
    assert one["accuracy_rule"] > 0.9
    assert abs(two["gap_rule_points"]) <= 2.0, table


@needs_mpi
@pytest.mark.slow
def test_model_fitted_on_two_ranks_predicts_the_three_rank_step(tmp_path):
    """The fit's inputs come from the jobs the command runs. Stated bound: the
    3-rank prediction within a factor of 2 of the measurement -- wide, because this
    machine is shared and the test must not turn on timing; the README gives the
    errors measured on a quiet machine."""
    out = tmp_path / "validate"
    result = scale("--validate", "--repeats", 1, "--rounds", 3, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    validation = json.loads((out / "validation.json").read_text())
    three = validation["summary"]["3"]
    assert 0.5 <= three["predicted_step_s"] / three["measured_step_s"] <= 2.0, three
    fit = json.loads((out / "fit-2-ranks-0.json").read_text())
    assert fit["workload"]["rounds"] == 3
    for name in ("shm", "mpi"):
        alpha, beta = fit["transports"][name]["alpha"], fit["transports"][name]["beta"]
        assert alpha >= 0 and beta > 0
        assert len(fit["transports"][name]["points"]) == 7  # 4 KB to 16 MB
    buckets = fit["workload"]["buckets"]
    assert sum(b["bytes"] for b in buckets) == sum(g["bytes"] for g in fit["workload"]["gradients"])
    assert all(0.0 <= b["ready"] <= 1.0 for b in buckets)
