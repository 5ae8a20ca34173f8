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

from helpers import INSTALL_SKLEARN
from train_helpers import TIMEOUT, digits_fixture, metrics, needs_mpiexec, summary, train  # noqa: F401 - a fixture

pytest.importorskip("sklearn", reason=INSTALL_SKLEARN)


def checkpoint_state(out, step):
    """What a checkpoint holds that an uninterrupted run must match: the two
    safetensors files' bytes, and meta.json's optimizer, schedule, loader position,
    random generators and the trainer's position (not the clock, the config given
    to each command, or the loss sums carried across a resume, see `reproducible`)."""
    path = out / "checkpoints" / f"step-{step:08d}"
    meta = json.loads((path / "meta.json").read_text())
    trainer = {k: v for k, v in meta["extra"]["trainer"].items() if k not in ("elapsed_s", "windows")}
    return {**{name: (path / name).read_bytes() for name in ("model.safetensors", "state.safetensors")},
            **{key: meta[key] for key in ("step", "world_size", "model", "optimizer", "scheduler", "loader", "rng")},
            "trainer": trainer}


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
    # The resolved config, printed once (by rank 0) and saved: what is trained, the model's sizes included.
    assert result.stdout.count(f"distprop train: {ranks} rank(s) on cpu, 10 classes") == 1
    assert "[rank 1]" not in result.stdout  # the other ranks stay quiet without --verbose
    assert result.stdout.count("  hidden_sizes ") == 1
    saved = (tmp_path / "config.toml").read_text()
    assert "hidden_sizes = [256]" in saved and 'input_column = "image"' in saved and "num_classes = 10" in saved


RESUME_CASES = [  # ranks, the step to stop at, options
    pytest.param(1, 17, ["--optimizer", "sgd", "--model", "mlp"], id="1-rank-sgd-mlp"),
    pytest.param(1, 17, ["--optimizer", "adam", "--lr", "0.003", "--model", "lenet"], id="1-rank-adam-lenet"),
    # An epoch of 20 steps: stopped at its end, after a checkpoint and an evaluation that
    # both fell on that step (the resumed run must not evaluate again).
    pytest.param(1, 20, ["--batch-size", 71, "--eval-every", 5], id="1-rank-stopped-at-an-epoch-end"),
    pytest.param(2, 17, ["--optimizer", "sgd", "--lr", "0.05", "--model", "lenet"], marks=needs_mpiexec,
                 id="2-ranks-sgd-lenet"),
    pytest.param(2, 17, ["--optimizer", "adam", "--lr", "0.003", "--accumulation-steps", "2", "--clip-grad-norm", "1"],
                 marks=needs_mpiexec, id="2-ranks-adam-accumulation-clipping"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, stop, options", RESUME_CASES)
def test_stopping_and_resuming_is_bitwise_the_same_as_not_stopping(tmp_path, digits, ranks, stop, options):
    """N steps, resume, M steps == N + M steps: parameters, optimizer state, schedule,
    loader position, random generators and the metrics, with shuffling, dropout,
    warmup and an epoch boundary after the resume."""
    common = ["--steps", 40, "--batch-size", 40, "--dropout", 0.2, "--warmup-steps", 5, "--checkpoint-every", 10,
              "--log-every", 3, "--eval-every", 12, "--data", digits, *options]  # later flags win
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, *common, ranks=ranks)
    stopped = train(parts, *common, "--stop-at", stop, ranks=ranks)
    assert f"stopped after step {stop} of 40" in stopped.stdout and summary(parts)["stopped_early"]
    resumed = train(parts, *common, "--resume", ranks=ranks)
    assert f"resuming from {parts / 'checkpoints' / f'step-{stop:08d}'} (step {stop}" in resumed.stdout
    assert checkpoint_state(whole, 40) == checkpoint_state(parts, 40)
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
def test_ctrl_c_names_the_checkpoint_to_resume_from_without_a_traceback(tmp_path, digits):
    """SIGINT once checkpoints exist: status 130, one line on stderr naming the newest
    complete checkpoint, no half-written one left, and --resume continues from it."""
    command = [sys.executable, "-m", "distprop", "train", "--out", str(tmp_path / "run"), "--data", str(digits),
               "--epochs", "1000", "--progress", "log"]
    root, deadline = tmp_path / "run" / "checkpoints", time.monotonic() + TIMEOUT
    with open(tmp_path / "log", "w") as log:
        # Ctrl-C reaches a job started from a terminal (a background job of a script ignores it)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            while not (root / "step-00000088").is_dir():  # two epochs' checkpoints
                assert process.poll() is None, process.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint of step 88 in time"
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    newest = root / (root / "latest").read_text().strip()
    assert process.returncode == 130
    assert stderr.splitlines() == [f"distprop train: interrupted; the newest complete checkpoint is {newest}: "
                                   "continue with --resume"]
    assert not any(name.startswith(".") for name in os.listdir(root))
    step = int(newest.name.split("-")[1])
    result = train(tmp_path / "run", "--resume", "--stop-at", step + 5)
    assert f"resuming from {newest} (step {step}" in result.stdout and summary(tmp_path / "run")["step"] == step + 5


@pytest.mark.slow
@needs_mpiexec
def test_the_timeline_is_a_trace_whose_bucket_reductions_overlap_backward(tmp_path, digits, monkeypatch):
    trace_file = tmp_path / "traces" / "trace.json"  # a directory made for it
    # 2 ranks on 2 cores would reduce every bucket when backward ends: ask for the thread
    monkeypatch.setenv("DISTPROP_SHM_OVERLAP", "1")
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
def test_a_resume_that_contradicts_the_checkpoint_stops_before_touching_anything(tmp_path, digits):
    out = tmp_path / "run"
    train(out, "--epochs", 1, "--data", digits)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    checkpoint = out / "checkpoints" / "step-00000044"
    result = train(out, "--resume", "--epochs", 2, "--hidden-sizes", 128, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"distprop train: error: hidden_sizes = [128] contradicts the checkpoint's hidden_sizes = [256] "
        f"({checkpoint}); a resumed job keeps its model, data, optimizer and schedule (use another --out for a "
        "new job)"]
    result = train(out, "--epochs", 2, "--data", digits, check=False)  # a new run into a used OUT
    assert result.returncode == 2 and "already holds checkpoints (step-00000044); pass --resume" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --resume PATH: a new run directory branching off that checkpoint, with a
    # metrics.jsonl of its own; giving the model's default size again is no contradiction.
    branch = tmp_path / "branch"
    result = train(branch, "--resume", checkpoint, "--epochs", 2, "--hidden-sizes", 256)
    assert f"resuming from {checkpoint} (step 44" in result.stdout
    assert summary(branch)["step"] == 88 and [r["step"] for r in metrics(branch)] == [50, 88]
    # Branching into a directory that holds another run's checkpoints would prune them.
    result = train(branch, "--resume", checkpoint, "--epochs", 3, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"distprop train: error: out: {branch} already holds checkpoints (step-00000088); resuming there from "
        f"{checkpoint}, outside it, would mix two runs: choose another --out"]


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
    with open(tmp_path / "again" / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "ep')  # a line a running job is still writing
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


def test_an_input_column_without_one_shape_per_sample_is_a_one_line_error(tmp_path):
    """Encoded images take their shape from decoding options the job does not have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distprop.errors import DataError
    from distprop.train.config import TrainConfig
    from distprop.train.data import describe_columns

    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"image": pa.array([b"\xff\xd8", b"\xff\xd8"]), "label": [0, 1]}),
                   tmp_path / "train" / "part.parquet")
    with pytest.raises(DataError) as info:
        describe_columns(TrainConfig(), str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path / 'train'}: input column 'image' holds encoded images; "
                                      "distprop train feeds the model a tensor of one shape per sample")


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    from distprop.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("distprop plot: error: matplotlib is not installed: "
                                       "pip install 'distprop[plot]'\n")
