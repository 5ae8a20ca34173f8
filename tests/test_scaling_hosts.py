"""Many hosts for real: three network-namespace hosts on this machine, one rank
each, MPI over TCP between them, jobs started from a hostfile through distprop
launch (tests/multihost.py). A 3-host training job against the same job on one
host, a host that dies, a sweep over 1, 2 and 3 hosts, and the cost model fitted
across two hosts on a link shaped to 1 Gb/s and held against three."""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from distprop.launcher import find_mpiexec, is_open_mpi
from mpi_launch import run_job
from multihost import VirtualHosts

pytestmark = pytest.mark.slow
WATCHDOG_S = 20


def _hosts(tmp_path_factory, rate=None):
    if not VirtualHosts.available() or find_mpiexec() is None or not is_open_mpi(find_mpiexec()):
        pytest.skip("needs root, iproute2, tc and Open MPI")
    try:
        with VirtualHosts(3, tmp_path_factory.mktemp("hosts"), rate=rate) as hosts:
            hosts.hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addresses))
            yield hosts
    except subprocess.CalledProcessError as error:  # namespaces refused (an unprivileged container)
        pytest.skip(f"cannot create network namespaces: {error}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from _hosts(tmp_path_factory)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    from distprop.data.converters import convert_digits

    path = tmp_path_factory.mktemp("digits")
    convert_digits(path, seed=0)
    return path


def train_args(digits, out, *extra):
    return ["-m", "distprop", "train", "--data", str(digits), "--out", str(out), "--model", "mlp", "--batch-size", "16",
            "--seed", "3", "--threads", "1", "--progress", "none", "--eval-every", "0", *map(str, extra)]


def final_parameters(out):
    from distprop.checkpoint import read_checkpoint
    from distprop.parallel.communicator import SingleProcessCommunicator

    return read_checkpoint(str(out), SingleProcessCommunicator()).model_state


def test_three_hosts_train_what_three_ranks_on_one_host_train(hosts, digits, tmp_path):
    across = hosts.launch(["-n", "3", "--", sys.executable, *train_args(digits, tmp_path / "hosts", "--steps", 6)],
                          timeout=300, DISTPROP_WATCHDOG_TIMEOUT=120)
    assert across.returncode == 0, across.stdout[-2000:] + across.stderr[-3000:]
    local, _ = run_job(3, train_args(digits, tmp_path / "local", "--steps", 6), timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    ours, reference = final_parameters(tmp_path / "hosts"), final_parameters(tmp_path / "local")
    assert sorted(ours) == sorted(reference)
    for name in reference:  # same global batch, same order; only the sums' order differs
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-5, atol=1e-7, err_msg=name)
    summary = json.loads((tmp_path / "hosts" / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["step"] == 6


def test_sweep_over_one_two_and_three_hosts(hosts, digits, tmp_path):
    out = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "distprop", "scale", "--ranks", "1,2,3", "--hostfile",
                             str(hosts.hostfile), "--threads", "1", "--data", str(digits), "--steps", "8",
                             "--warmup", "2", "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env=hosts.environment())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sweep = json.loads((out / "scaling.json").read_text())
    assert [r["ranks"] for r in sweep["results"]] == [1, 2, 3] and sweep["hosts"] == str(hosts.hostfile)
    assert all(r["baseline_throughput"] > 0 and r["throughput"] > 0 for r in sweep["results"])
    for ranks in (2, 3):
        run = json.loads((out / "runs" / f"{ranks}-ranks-0" / "summary.json").read_text())
        assert run["world_size"] == ranks and run["phases"]["comm_wait_s"]["max"] > 0
    assert (out / "scaling.csv").read_text().count("\n") == 1 + 3 * 2


def test_a_host_that_dies_ends_the_job_on_the_others(hosts, digits, tmp_path):
    out = tmp_path / "dies"
    finished = []
    job = threading.Thread(target=lambda: finished.append(hosts.launch(
        ["-n", "3", "--", sys.executable, *train_args(digits, out, "--steps", 100_000, "--log-every", 1)],
        timeout=300, DISTPROP_WATCHDOG_TIMEOUT=WATCHDOG_S)))
    job.start()
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    assert metrics.exists(), "the job never started training"
    killed_at = time.monotonic()
    pids = subprocess.run(["ip", "netns", "pids", hosts.namespaces[2]], capture_output=True, text=True,
                          timeout=30).stdout.split()
    assert pids, "nothing ran on the third host"
    subprocess.run(["kill", "-9", *pids], capture_output=True, timeout=30)
    job.join(timeout=WATCHDOG_S + 120)
    assert not job.is_alive(), "the job outlived a dead host"
    assert time.monotonic() - killed_at < WATCHDOG_S + 60, "the job ended, but not within the watchdog's timeout"
    # Ended, not finished: no summary, and a failed status (Open MPI 5's mpiexec itself
    # may exit 0 when a host's daemon is killed; distprop launch sees the ranks' markers).
    assert not (out / "summary.json").exists(), finished[0].stdout[-2000:]
    assert finished[0].returncode != 0, finished[0].stderr[-3000:]
    for namespace in hosts.namespaces[:2]:
        left = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
        assert not left.stdout.split(), f"processes left on {namespace}: {left.stdout.split()}"


@pytest.fixture(scope="module")
def shaped_hosts(tmp_path_factory):
    yield from _hosts(tmp_path_factory, rate="1gbit")


def test_model_fitted_across_two_hosts_at_1_gbit_predicts_three(shaped_hosts, tmp_path):
    """Fit on 2 hosts (alpha and beta of MPI over the shaped TCP link, the workload),
    predict the 3-host step and measure it. The 3-host step is mostly MPI's allreduce
    over the shaped links, which folds the third host in and out (modelled as
    recursive halving and doubling; a ring's formula predicted 2.6x too short).
    Stated bound: within a factor of 2 (measured -19% and +31% on this shared
    machine; the README gives the errors)."""
    out = tmp_path / "validate"
    result = subprocess.run([sys.executable, "-m", "distprop", "scale", "--validate", "--hostfile",
                             str(shaped_hosts.hostfile), "--repeats", "1", "--rounds", "3", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env=shaped_hosts.environment())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    validation = json.loads((out / "validation.json").read_text())
    fit = json.loads((out / "fit-2-ranks-0.json").read_text())
    assert "shm" not in fit["transports"] and fit["machine"]["nodes_share_cores"]
    assert fit["transports"]["mpi"]["beta"] > 1 / 0.125e9 * 0.5  # at most about 1 Gb/s
    assert fit["transports"]["mpi"]["beta"] < 1 / 0.125e9 * 4  # and not far below it
    two, three = validation["summary"]["2"], validation["summary"]["3"]
    assert three["predicted_step_s"] > two["predicted_step_s"] and three["measured_step_s"] > two["measured_step_s"]
    assert 0.5 <= three["predicted_step_s"] / three["measured_step_s"] <= 2.0, three
