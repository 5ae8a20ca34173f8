"""The training loop of `distprop train`: steps, evaluation, logging, checkpoints.

The loop reads top to bottom: an epoch is the steps left in the loader's current
epoch (all of them, or what a resumed checkpoint left), each step one or more
micro-batches (forward, backward; all but the last under `no_sync`) and one
optimizer step; evaluation, logging and checkpoints come between steps.

Exact resume rests on three things: a checkpoint is taken only between optimizer
steps, where the loader's position is exactly the batches handed out (the loop
never reads ahead of the step it runs); the trainer's own position (epoch, step,
whether the epoch's end-of-epoch work is done) is saved with it; and everything
random is restored last.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass

import distprop.functional as F
from distprop.checkpoint import save_checkpoint
from distprop.parallel import clip_grad_norm_
from distprop.train.data import batches_left_in_epoch
from distprop.train.evaluation import evaluate
from distprop.train.metrics import PHASES, Totals, Window, mean_over_ranks

clock = time.perf_counter


@dataclass
class TrainerState:
    """Where the job is; saved in every checkpoint (as `extra["trainer"]`)."""

    epoch: int = 0
    epoch_done: bool = False   # the epoch's steps and its end-of-epoch work are done
    step: int = 0              # optimizer steps taken
    samples: int = 0           # samples trained on, all ranks together
    per_rank_batch: int = 0
    peak_lr: float = 0.0
    total_steps: int = 0       # the job's length the schedule was built for
    evaluated_step: int = -1   # the step of the last evaluation (a resumed run must not repeat it)
    metrics_lines: int = 0     # lines in metrics.jsonl (rank 0's count)
    elapsed_s: float = 0.0     # wall time of the job's runs so far
    windows: dict | None = None  # loss sums of the open log and eval windows, averaged over ranks

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


class Trainer:
    def __init__(self, *, config, comm, model, optimizer, scheduler, train_loader, test_loader, prepare,
                 input_name: str, label: str, state: TrainerState, out: str, epochs: int | None,
                 metrics_log=None, progress, timeline=None):
        self.config, self.comm, self.model = config, comm, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.test_loader = train_loader, test_loader
        self.prepare, self.input_name, self.label = prepare, input_name, label
        self.state, self.out, self.epochs = state, out, epochs
        self.metrics_log, self.progress, self.timeline = metrics_log, progress, timeline
        self.reducer = getattr(model, "reducer", None)
        self.parameters = list(model.parameters())
        self.accumulation = config.accumulation_steps
        self.label_smoothing, self.clip_grad_norm = config.label_smoothing, config.clip_grad_norm
        self._synchronised = contextlib.nullcontext()  # the last micro-batch's: gradients are averaged
        self.samples_per_step = state.per_rank_batch * self.accumulation * comm.size
        self.final_step = min(state.total_steps, config.stop_at or state.total_steps)
        self.totals = Totals()
        self.log_window, self.eval_window = Window(self.totals), Window(self.totals)
        for name, window in (("log", self.log_window), ("eval", self.eval_window)):
            if state.windows:
                window.resume(state.windows[name])
        self.whole_run = Window(self.totals)
        self.timed = None  # summary.json's window: from the end of timing_warmup on
        self.run_steps = 0
        self.lr = optimizer.param_groups[0]["lr"]
        self.last_checkpoint_step = None
        self.last_eval: dict = {}
        self.checkpoint_path = None
        self.started, self.elapsed_before = clock(), state.elapsed_s

    # ---- the loop ----------------------------------------------------------------
    def run(self) -> dict:
        state = self.state
        self.loop_started, self.loop_cpu_started = clock(), time.process_time()
        self.paused = self.paused_cpu = 0.0
        while state.step < self.final_step:
            if state.epoch_done:
                state.epoch, state.epoch_done = state.epoch + 1, False
            self.train_loader.set_epoch(state.epoch)
            self.progress.epoch(state.epoch, self.epochs)
            steps = batches_left_in_epoch(self.train_loader) // self.accumulation
            iterator = iter(self.train_loader) if steps else None
            try:
                for _ in range(steps):
                    if state.step >= self.final_step:
                        break
                    self._train_step(iterator)
                    self._after_step()
                else:
                    self._end_epoch()
            finally:
                if iterator is not None:
                    iterator.close()  # stops the loader's read-ahead threads
        return self._finish()

    def _train_step(self, iterator) -> None:
        state, model, reducer, timeline = self.state, self.model, self.reducer, self.timeline
        number = state.step + 1
        recording = timeline is not None and timeline.recording(number)
        if reducer is not None:
            reducer.trace = timeline.reductions if recording else None
        data = forward = backward = comm = loss_sum = 0.0
        start = clock()
        for micro in range(self.accumulation):
            t0 = clock()
            batch = next(iterator)
            x, targets = self.prepare(batch[self.input_name]), batch[self.label]
            t1 = clock()
            with self._synchronised if micro == self.accumulation - 1 else model.no_sync():
                loss = F.cross_entropy(model(x), targets, label_smoothing=self.label_smoothing)
                if self.accumulation > 1:
                    loss = loss * (1.0 / self.accumulation)
                loss_sum += loss.item()  # on the GPU, forward's queued work is paid here
                t2 = clock()
                synced_before = reducer.sync_seconds if reducer is not None else 0.0
                loss.backward()
                t3 = clock()
            waited = reducer.sync_seconds - synced_before if reducer is not None else 0.0
            data += t1 - t0
            forward += t2 - t1
            backward += t3 - t2 - waited
            comm += waited
            if recording:
                for name, a, b in (("data_wait", t0, t1), ("forward", t1, t2), ("backward", t2, t3)):
                    timeline.span(name, a, b)
        t4 = clock()
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.clip_grad_norm is not None:
            clip_grad_norm_(self.parameters, self.clip_grad_norm, self.comm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        end = clock()
        if recording:
            timeline.span("optimizer", t4, end)
            timeline.span(f"step {number}", start, end)
            if reducer is not None:
                reducer.trace = None
        state.step = number
        state.samples += self.samples_per_step
        self.run_steps += 1
        self.totals.add(end - start, loss_sum, self.samples_per_step, data, forward, backward, comm, end - t4)
        if self.run_steps == self.config.timing_warmup:
            self.timed = Window(self.totals)  # the steps from here on

    def _after_step(self) -> None:
        step, config = self.state.step, self.config
        self.progress.step()
        if step % config.log_every == 0:
            self._log_training()
        if config.eval_every and step % config.eval_every == 0:
            self._evaluate()
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self._checkpoint()

    def _end_epoch(self) -> None:
        self.state.epoch_done = True
        if self.state.evaluated_step != self.state.step:
            self._evaluate()
        if not self.config.checkpoint_every and self.state.step < self.final_step:
            self._checkpoint()  # the end of the job writes its own below

    def _finish(self) -> dict:
        stopped = self.state.step < self.state.total_steps
        if not stopped and self.state.evaluated_step != self.state.step:
            self._evaluate()
        if self.last_checkpoint_step != self.state.step:
            self._checkpoint()
        if stopped:
            self.progress.message(f"stopped after step {self.state.step} of {self.state.total_steps} (stop_at); "
                                  f"continue with --resume")
        return self._summary(stopped)

    # ---- between steps -------------------------------------------------------------
    def _window_record(self, window: Window) -> dict:
        """The window's means averaged over ranks (one allreduce, every rank)."""
        means = mean_over_ranks(window.local_means(), self.comm)
        means["samples_per_s"] = self.samples_per_step / means["step_s"] if means["step_s"] else 0.0
        return means

    def _record(self, kind: str, **values) -> dict:
        state = self.state
        record = {"kind": kind, "epoch": state.epoch, "step": state.step, "samples": state.samples,
                  "train_loss": None, "test_loss": None, "test_accuracy": None, "lr": self.lr,
                  "samples_per_s": None, "comm_wait_fraction": None}
        record.update(values)
        record["wall_time"] = time.time()
        record["elapsed_s"] = self._elapsed()
        if self.metrics_log is not None:
            self.metrics_log.write(record)
        return record

    def _log_training(self) -> None:
        local = self.log_window.local_means()
        record = self._record("train", **self._window_record(self.log_window))
        self.log_window.reset()
        if self.comm.rank:  # a verbose rank shows its own figures
            record = {**record, **local, "samples_per_s": self.samples_per_step / local["step_s"]}
        self.progress.log(record, self.epochs)

    def _evaluate(self) -> None:
        started, started_cpu = clock(), time.process_time()
        result = evaluate(self.model, self.test_loader, self.prepare, self.label, self.input_name, self.comm)
        training = self._window_record(self.eval_window) if self.eval_window.losses else {}
        self.eval_window.reset()
        self._record("eval", **training, **result)
        self.state.evaluated_step, self.last_eval = self.state.step, result
        self.progress.message(f"epoch {self.state.epoch + 1}  step {self.state.step}  test loss "
                              f"{result['test_loss']:.4f}  test accuracy {result['test_accuracy']:.4f}")
        self.paused += clock() - started
        self.paused_cpu += time.process_time() - started_cpu

    def _checkpoint(self) -> None:
        started, started_cpu = clock(), time.process_time()
        state = self.state
        state.elapsed_s = self._elapsed()
        state.metrics_lines = self.metrics_log.lines if self.metrics_log is not None else 0
        # The open windows' loss sums, as every rank's average: averaging is linear,
        # so after a resume (at any world size) the windows' means come out the same.
        sums = mean_over_ranks({f"{name}_{key}": value for name, window in
                                (("log", self.log_window), ("eval", self.eval_window))
                                for key, value in window.carry().items()}, self.comm)
        state.windows = {name: {"loss": sums[f"{name}_loss"], "losses": round(sums[f"{name}_losses"])}
                         for name in ("log", "eval")}
        self.checkpoint_path = save_checkpoint(
            os.path.join(self.out, "checkpoints"), model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, loader=self.train_loader, step=state.step,
            extra={"trainer": asdict(state)}, config=self.config.to_dict(), keep=self.config.keep_checkpoints,
            comm=self.comm)
        self.last_checkpoint_step = state.step
        self.progress.message(f"checkpoint {self.checkpoint_path}")
        self.paused += clock() - started
        self.paused_cpu += time.process_time() - started_cpu

    def _elapsed(self) -> float:
        return self.elapsed_before + (clock() - self.started)

    def _summary(self, stopped: bool) -> dict:
        """Phase times per step over the steps after timing_warmup (all steps of this
        run if it had no more): mean over ranks, and the slowest rank's mean."""
        loop_s = clock() - self.loop_started - self.paused
        loop_cpu_s = time.process_time() - self.loop_cpu_started - self.paused_cpu
        timed = self.timed is not None and self.timed.steps > 0
        window = self.timed if timed else self.whole_run
        local = window.local_means()
        everyone = self.comm.allgather_object(local) if self.comm.size > 1 else [local]
        spread = {key: {"mean": sum(r[key] for r in everyone) / len(everyone), "max": max(r[key] for r in everyone)}
                  for key in [f"{p}_s" for p in PHASES] + ["step_s", "comm_wait_fraction"]}
        mean_step = spread["step_s"]["mean"]
        return {
            "step": self.state.step, "epoch": self.state.epoch, "total_steps": self.state.total_steps,
            "stopped_early": stopped, "steps_this_run": self.run_steps, "world_size": self.comm.size,
            "per_rank_batch": self.state.per_rank_batch, "accumulation_steps": self.accumulation,
            "global_batch": self.samples_per_step, "samples": self.state.samples,
            "test_loss": None if stopped else self.last_eval.get("test_loss"),
            "test_accuracy": None if stopped else self.last_eval.get("test_accuracy"),
            "timed_steps": window.steps, "timing_warmup": self.config.timing_warmup if timed else 0,
            "samples_per_s": self.samples_per_step / mean_step if mean_step else 0.0,
            # All of this run's loop but evaluation and checkpoints (steps, bookkeeping,
            # logging): wall seconds, and CPU seconds of this process (all its threads).
            "loop_s": loop_s, "loop_cpu_s": loop_cpu_s,
            "loop_samples_per_s": self.run_steps * self.samples_per_step / loop_s if loop_s > 0 else 0.0,
            "phases": spread, "elapsed_s": self._elapsed(), "checkpoint": self.checkpoint_path,
        }
