"""`distprop train` from a resolved config to a finished (or stopped) job.

Every check that can fail is made on every rank and agreed on before anyone
stops (`agreed`), so a bad dataset path or a batch larger than the data ends the
whole job with one message from rank 0, and nothing under OUT is written until
the config, the data, the model and any checkpoint to resume from have passed.
"""

from __future__ import annotations

import json
import os

import distprop as dp
from distprop import backend
from distprop.checkpoint import CheckpointError, newest_checkpoint, read_checkpoint, rng
from distprop.checkpoint.durable import write_text_durably
from distprop.errors import ConfigError, UserError
from distprop.train import data as job_data
from distprop.train import resume
from distprop.train.config import describe, to_toml
from distprop.train.metrics import MetricsLog
from distprop.train.models import build_model, input_preparer
from distprop.train.optimization import build_optimizer, build_schedule, peak_lr, restart_schedule
from distprop.train.progress import Progress, choose_mode
from distprop.train.timeline import Timeline
from distprop.train.trainer import Trainer, TrainerState


def agreed(comm, function, *args):
    """function(*args) on every rank; if it raises a UserError on any rank, the same
    error (the lowest failing rank's message) is raised on every rank."""
    result, message = None, None
    try:
        result = function(*args)
    except UserError as error:
        message = str(error)
    messages = comm.allgather_object(message) if comm.size > 1 else [message]
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if failed:
        rank, text = failed[0]
        raise ConfigError(text if rank == 0 else f"rank {rank}: {text}")
    return result


def on_rank_zero(comm, what: str, function, *args, share: bool = True):
    """function(*args) on rank 0 only; its UserError, or an OSError (prefixed with
    `what`), raised on every rank. Returns its result on every rank if `share`, else
    on rank 0 only (None elsewhere)."""
    result = message = None
    if comm.rank == 0:
        try:
            result = function(*args)
        except UserError as error:
            message = str(error)
        except OSError as error:
            message = f"{what}: {error}"
    if comm.size > 1:
        shared, message = comm.bcast_object((result if share else None, message), root=0)
        if share:
            result = shared
    if message is not None:
        raise ConfigError(message)
    return result


def start(config):
    """The job's communicator and device ('cpu' or 'gpu')."""
    comm = dp.init(device=None if config.device == "auto" else config.device, threads=config.threads)
    if config.device != "auto":
        return comm, config.device
    # init() picked a GPU exactly where every rank sees one; follow the same verdict
    on_gpu = comm.allreduce(int(backend.gpu_available()), "min") if comm.size > 1 else backend.gpu_available()
    return comm, "gpu" if on_gpu else "cpu"


def run_job(config, comm, device: str) -> dict:
    """Prepare everything, train, and return the summary (also in OUT/summary.json)."""
    checkpoint, config = _checkpoint_and_config(config, comm)
    trainer_state = checkpoint.extra["trainer"] if checkpoint is not None else None
    if trainer_state is not None and config.stop_at is not None and config.stop_at <= trainer_state["step"]:
        raise ConfigError(f"stop_at ({config.stop_at}) is not after the checkpoint's step {trainer_state['step']}")
    config, dataset = _dataset(config, comm)

    batch = agreed(comm, resume.per_rank_batch, config, checkpoint, trainer_state, comm.size)
    train_loader, test_loader = agreed(comm, job_data.make_loaders, config, dataset, batch, comm, device)
    if checkpoint is not None:
        checkpoint.restore(loader=train_loader, rng_state=False, comm=comm)
    # Every rank must see the same data, at the same position, or the step counts differ and the job hangs.
    agreed(comm, train_loader.check_consistent, comm)
    steps_per_epoch = len(train_loader) // config.accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"accumulation_steps ({config.accumulation_steps}) is more than the "
                          f"{len(train_loader)} batches of {batch} per rank in an epoch")

    dp.manual_seed(config.seed)  # the same initial weights on every rank (rank 0's are broadcast anyway)
    model = agreed(comm, build_model, config, dataset.input, dataset.num_classes)
    if device == "gpu":
        model.to(device="gpu")
    model = dp.DataParallel(model, comm, bucket_mb=config.bucket_mb, first_bucket_mb=min(1.0, config.bucket_mb))
    lr = peak_lr(config, batch, comm.size)
    optimizer = build_optimizer(config, model.parameters(), lr)

    if checkpoint is None:
        total = config.steps or config.epochs * steps_per_epoch
        scheduler = agreed(comm, build_schedule, config, optimizer, total)
        state = TrainerState(per_rank_batch=batch, peak_lr=lr, total_steps=total)
        rng.seed(_rank_seed(config.seed, comm.rank, 0))  # dropout masks differ between ranks
    else:
        state = TrainerState.from_dict(trainer_state)
        remaining = 0 if state.epoch_done else job_data.batches_left_in_epoch(train_loader) // config.accumulation_steps
        total = config.steps or state.step + remaining + (config.epochs - state.epoch - 1) * steps_per_epoch
        if state.step >= total:
            _say(comm, f"{checkpoint.path} is at step {state.step}, the end of a job of {total} steps: nothing to "
                       "do (give more --epochs or --steps to train on)")
            model.close()
            return {"step": state.step, "total_steps": total, "nothing_to_do": True}
        scheduler = _restore_training(config, comm, checkpoint, state, model, optimizer, lr, total)
        state.per_rank_batch, state.peak_lr, state.total_steps = batch, lr, total
        _say(comm, f"resuming from {checkpoint.path} (step {state.step}, saved by {checkpoint.world_size} "
                   f"rank(s), now {comm.size} with {batch} samples each)")

    metrics_log = on_rank_zero(comm, "out", _open_outputs, config, checkpoint, trainer_state, share=False)
    if comm.rank == 0:
        print(f"distprop train: {comm.size} rank(s) on {device}, {dataset.num_classes} classes, input "
              f"'{dataset.input.name}' {dataset.input.describe()}, global batch "
              f"{batch * comm.size * config.accumulation_steps}, {steps_per_epoch} steps per epoch, {total} steps\n"
              f"{describe(config)}", flush=True)
    timeline = None
    if config.timeline:
        last = min(total, config.stop_at or total)
        first = max(state.step + 1, min(config.timeline_start, last - config.timeline_steps + 1))
        timeline = Timeline(comm, first, min(last, first + config.timeline_steps - 1))

    progress = Progress(choose_mode(config.progress, comm.rank, config.verbose), comm.rank, total, state.step)
    trainer = Trainer(config=config, comm=comm, model=model, optimizer=optimizer, scheduler=scheduler,
                      train_loader=train_loader, test_loader=test_loader, prepare=input_preparer(config, dataset.input),
                      input_name=dataset.input.name, label=dataset.label, state=state, out=config.out,
                      epochs=None if config.steps else config.epochs, metrics_log=metrics_log, progress=progress,
                      timeline=timeline)
    try:
        summary = trainer.run()
    finally:
        progress.close()
        model.close()
        if metrics_log is not None:
            metrics_log.close()
    if timeline is not None:
        timeline.write(config.timeline)
    if comm.rank == 0:
        write_text_durably(os.path.join(config.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
        if summary["test_accuracy"] is not None:
            print(f"final test accuracy {summary['test_accuracy']:.4f}  test loss {summary['test_loss']:.4f}  "
                  f"after {summary['step']} steps, {summary['elapsed_s']:.1f} s", flush=True)
    return summary


def _checkpoint_and_config(config, comm):
    """The checkpoint to resume from (None for a new job), and the config to run:
    a resumed job's takes the checkpoint's options not given again. What OUT holds
    is rank 0's view, shared: other nodes may see a network file system late."""
    path = on_rank_zero(comm, "out", resume.checkpoint_to_resume, config)
    if path is None:
        on_rank_zero(comm, "out", resume.check_fresh_start, config)
        if config.resume is not None:
            _say(comm, f"no checkpoint in {os.path.join(config.out, 'checkpoints')} yet: starting the job")
        return None, config
    try:
        checkpoint = read_checkpoint(path, comm)
    except CheckpointError as error:  # raised alike on every rank
        raise ConfigError(f"resume: {error}") from None
    on_rank_zero(comm, "out", resume.check_branch, config, checkpoint)
    return checkpoint, agreed(comm, resume.reconcile, config, checkpoint)


def _dataset(config, comm):
    """The dataset (digits written on first use), and the config with the input and
    label columns and the number of classes it found filled in."""
    agreed(comm, job_data.check_dataset_directory, config, config.out)
    directory = job_data.dataset_directory(config, config.out)
    if config.data == "digits":
        on_rank_zero(comm, f"data: cannot write the digits to {directory}", job_data.write_digits_once, directory)
    spec, label, train_samples = agreed(comm, job_data.describe_columns, config, directory)
    train_dir, test_dir = os.path.join(directory, "train"), os.path.join(directory, "test")
    num_classes = config.num_classes or on_rank_zero(comm, f"data: {train_dir}", job_data.count_classes,
                                                     train_dir, label)
    dataset = job_data.Dataset(train_dir, test_dir, spec, label, num_classes, train_samples)
    return config.replaced(input_column=spec.name, label_column=label, num_classes=num_classes), dataset


def _restore_training(config, comm, checkpoint, state, model, optimizer, lr: float, total: int):
    """Model, optimizer, schedule and random generators from the checkpoint; returns
    the schedule. A job whose length or lr changed keeps the optimizer's moments and
    continues on the new schedule's curve."""
    if (total, lr) == (state.total_steps, state.peak_lr):
        # Built before the optimizer's state is loaded: building sets the lr it restores.
        scheduler = agreed(comm, build_schedule, config, optimizer, total)
        checkpoint.restore(model=model, optimizer=optimizer, scheduler=scheduler, rng_state=False, comm=comm)
    else:
        checkpoint.restore(model=model, optimizer=optimizer, rng_state=False, comm=comm)
        scheduler = agreed(comm, restart_schedule, config, optimizer, total, lr, state.step)
        _say(comm, f"the job now has {total} steps at lr {lr:g} (the checkpoint's schedule: "
                   f"{state.total_steps} at {state.peak_lr:g}): the schedule continues on the new curve")
    if not checkpoint.restore(rng_state=True, comm=comm):  # last: nothing draws after it
        rng.seed(_rank_seed(config.seed, comm.rank, state.step))
    return scheduler


def _open_outputs(config, checkpoint, trainer_state) -> MetricsLog:
    """Rank 0: OUT, config.toml, the timeline's directory, and metrics.jsonl (a
    resumed run's own file cut back to its checkpoint)."""
    os.makedirs(config.out, exist_ok=True)
    if config.timeline:
        os.makedirs(os.path.dirname(os.path.abspath(config.timeline)), exist_ok=True)
    write_text_durably(os.path.join(config.out, "config.toml"), to_toml(config))
    keep = resume.metrics_lines_to_keep(config, checkpoint, trainer_state)
    return MetricsLog(os.path.join(config.out, "metrics.jsonl"), keep)


def interrupted_message(out: str) -> str:
    """What rank 0 says when the job is interrupted (Ctrl-C)."""
    newest = newest_checkpoint(os.path.join(out, "checkpoints"))
    if newest is None:
        return "interrupted before the first checkpoint"
    return f"interrupted; the newest complete checkpoint is {newest}: continue with --resume"


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed of its own for each rank's random generators -- dropout masks, and
    numpy's and Python's global ones for whatever else draws -- and each resumed
    stretch, so a stream never repeats after a resume at another world size."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def _say(comm, text: str) -> None:
    if comm.rank == 0:
        print(f"distprop train: {text}", flush=True)
