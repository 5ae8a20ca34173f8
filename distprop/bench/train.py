"""`distprop bench train`: what the training job costs beyond the training itself.

1. Bookkeeping. The default job (the MLP on the UCI digits, batch 32) run by
   `distprop train` -- progress as log lines, metrics.jsonl, phase timings, timeline
   off -- against a plain loop over the same model, loader, optimizer and schedule
   (what examples/train_digits.py does), evaluated after each epoch as the job is.
   Both are timed over their training steps only: evaluation and checkpoints are
   left out of both. Interleaved rounds, one
   process, one thread; the ratio is the job's samples per second over the loop's,
   in wall time and in this process's CPU time (which other processes on a shared
   machine disturb far less).
2. Checkpoints. `save_checkpoint` of a model of about 100 MB (a 5000x5000 Linear:
   two safetensors files, meta.json, fsyncs, renames, the latest marker) against
   one `safetensors.numpy.save_file` of the same state_dict, and against that call
   followed by an fsync (what durability costs by itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time

from distprop.bench.timing import environment_note, median


def configure(parser) -> None:
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of each measurement")
    parser.add_argument("--steps", type=int, default=220, help="training steps per round (220: 5 epochs)")
    parser.add_argument("--model-mb", type=float, default=100.0, help="checkpointed model size (MB)")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary "
                        "directory under the current one, so the same file system as a run's)")


def run(args) -> int:
    import distprop as dp

    print(environment_note())
    comm = dp.init(device="cpu", threads=1)  # a tiny model: one thread is its fastest, and steadier
    if comm.size != 1:
        raise SystemExit("distprop bench train runs in one process")
    work = tempfile.mkdtemp(prefix=".bench-train-", dir=args.dir or os.getcwd())
    try:
        bookkeeping(args, comm, work)
        checkpoints(args, comm, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---- 1. the job against a plain loop ------------------------------------------------

def bookkeeping(args, comm, work: str) -> None:
    from distprop.cli import build_parser
    from distprop.data.converters import convert_digits
    from distprop.train.cli import config_from_args

    data = os.path.join(work, "digits")
    convert_digits(data, seed=0)
    job_runs, loop_runs = [], []
    for round_number in range(args.rounds + 1):  # round 0 warms both up and is not counted
        out = os.path.join(work, f"run{round_number}")
        argv = ["train", "--data", data, "--steps", str(args.steps), "--out", out, "--progress", "log",
                "--checkpoint-every", str(args.steps)]
        config = config_from_args(build_parser("train").parse_args(argv))
        if round_number % 2:  # alternate which goes first, so neither always follows the other
            job, loop = job_loop_seconds(config, comm), plain_loop_seconds(config, data, args.steps)
        else:
            loop, job = plain_loop_seconds(config, data, args.steps), job_loop_seconds(config, comm)
        if round_number:
            job_runs.append(job)
            loop_runs.append(loop)
    samples = args.steps * 32
    print(f"job vs plain loop: MLP [256] on the digits, batch 32, one thread, {args.steps} steps per round, "
          f"{args.rounds} rounds")
    for what, index in (("wall", 0), ("CPU", 1)):
        job = [run[index] for run in job_runs]
        loop = [run[index] for run in loop_runs]
        print(f"  {what:4} plain loop {samples / median(loop):9,.0f} samples/s, job {samples / median(job):9,.0f} "
              f"samples/s (medians); job / loop throughput {median(loop) / median(job):.3f} (medians), "
              f"{min(loop) / min(job):.3f} (best rounds)")
    print("  target: >= 0.98. CPU time (this process's, all threads) is what the bookkeeping costs; wall time "
          "also carries what other processes on the machine take")


def job_loop_seconds(config, comm) -> tuple[float, float]:
    """(wall, CPU) seconds of the job's loop, evaluation and checkpoints left out."""
    from distprop.train.job import run_job

    with contextlib.redirect_stdout(io.StringIO()):  # the log lines are printed, then dropped
        summary = run_job(config, comm, "cpu")
    return summary["loop_s"], summary["loop_cpu_s"]


def plain_loop_seconds(config, data: str, steps: int) -> tuple[float, float]:
    """The example's loop, same pieces as the job's: (wall, CPU) seconds of its steps."""
    import distprop as dp
    import distprop.functional as F
    from distprop import nn, optim
    from distprop.data import ArrowLoader

    dp.manual_seed(config.seed)
    model = dp.DataParallel(nn.MLP(64, [256], 10))
    opt = optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                    weight_decay=config.weight_decay)
    schedule = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loader = ArrowLoader(os.path.join(data, "train"), config.batch_size, seed=config.seed)
    test = ArrowLoader(os.path.join(data, "test"), config.eval_batch_size, shuffle=False, drop_last=False)
    done, epoch, wall, cpu = 0, 0, 0.0, 0.0
    while done < steps:
        loader.set_epoch(epoch)
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in loader:
            loss = F.cross_entropy(model(dp.tensor(batch["image"])), batch["label"],
                                   label_smoothing=config.label_smoothing)
            loss.item()
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
            done += 1
            if done == steps:
                break
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        epoch += 1
        model.eval()  # untimed, as the job's evaluation after each epoch is
        with dp.no_grad():
            for batch in test:
                model(dp.tensor(batch["image"])).data.argmax(axis=1)
        model.train()
    model.close()
    return wall, cpu


# ---- 2. a checkpoint against one safetensors call ---------------------------------------

def checkpoints(args, comm, work: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    import distprop as dp
    from distprop import nn
    from distprop.checkpoint.durable import fsync_path

    side = int(round((args.model_mb * 1e6 / 4) ** 0.5))
    dp.manual_seed(0)
    model = nn.Linear(side, side)
    state = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    megabytes = sum(v.nbytes for v in state.values()) / 1e6
    reference = os.path.join(work, "reference.safetensors")

    def one_call():
        save_file(state, reference, metadata={"format": "pt"})

    def one_call_and_fsync():
        one_call()
        fsync_path(reference)

    counter = iter(range(10 ** 9))

    def ours():
        dp.save_checkpoint(os.path.join(work, "checkpoints"), model=model, step=next(counter), keep=2, comm=comm)

    times = {"safetensors": [], "safetensors+fsync": [], "save_checkpoint": []}
    functions = {"safetensors": one_call, "safetensors+fsync": one_call_and_fsync, "save_checkpoint": ours}
    for round_number in range(args.rounds + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_number:
                times[name].append(time.perf_counter() - start)
    print(f"checkpoint of a {megabytes:.0f} MB model (Linear({side}, {side})), {args.rounds} rounds, "
          f"directory {work}")
    for name, samples in times.items():
        print(f"  {name:17} {median(samples) * 1e3:8.1f} ms (range {min(samples) * 1e3:.1f}-{max(samples) * 1e3:.1f})")
    ratios = [c / s for c, s in zip(times["save_checkpoint"], times["safetensors"])]
    durable = [c / s for c, s in zip(times["save_checkpoint"], times["safetensors+fsync"])]
    print(f"  save_checkpoint / one safetensors call          {median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); target <= 1.5")
    print(f"  save_checkpoint / one safetensors call + fsync  {median(durable):.2f} "
          f"(range {min(durable):.2f}-{max(durable):.2f})")
