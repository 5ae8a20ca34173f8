"""What a run measures: per-step phase times summed over windows of steps, and the
``metrics.jsonl`` file rank 0 appends to.

A step's phases, on each rank, in seconds of that rank's wall clock:

* ``data_wait``: waiting for the loader's next batch and turning it into the
  model's input;
* ``forward``: the model and the loss;
* ``backward``: backpropagation, less what it spent on communication;
* ``comm_wait``: communication that backward could not hide -- the gradient hooks'
  bookkeeping plus the wait for the last bucket reductions at its end (the
  reducer's own count); zero on one rank;
* ``optimizer``: gradient clipping, the optimizer and schedule steps, zero_grad.

On the GPU these are host times: kernels still queued when a phase ends are paid
for by a later phase that waits on them (at the latest `loss.item()`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from distprop.checkpoint.durable import write_text_durably

PHASES = ("data_wait", "forward", "backward", "comm_wait", "optimizer")


class Totals:
    """Running sums over every step this process ran: steps, seconds, samples, loss,
    then each phase's seconds. One `add` per step is all the loop pays; windows
    are differences of these sums."""

    def __init__(self):
        self.values = [0.0] * (4 + len(PHASES))

    def add(self, seconds: float, loss: float, samples: int, data_wait: float, forward: float, backward: float,
            comm_wait: float, optimizer: float) -> None:
        values = self.values
        values[0] += 1
        values[1] += seconds
        values[2] += samples
        values[3] += loss
        values[4] += data_wait
        values[5] += forward
        values[6] += backward
        values[7] += comm_wait
        values[8] += optimizer


class Window:
    """A stretch of steps since `reset`: a log interval, the stretch since the last
    evaluation, or the timed part of the run for summary.json.

    The loss sum can be carried over a resume (`carry`, `resume`), so that a
    window cut by a checkpoint reports the same mean as an uninterrupted run;
    times cannot be, and count only the steps this process ran."""

    def __init__(self, totals: Totals):
        self.totals = totals
        self.reset()

    def reset(self) -> None:
        self.start = list(self.totals.values)
        self.carried_loss, self.carried_losses = 0.0, 0

    @property
    def steps(self) -> int:
        return int(self.totals.values[0] - self.start[0])

    @property
    def losses(self) -> int:
        return self.steps + self.carried_losses

    def carry(self) -> dict:
        return {"loss": self.totals.values[3] - self.start[3] + self.carried_loss, "losses": self.losses}

    def resume(self, carried: dict) -> None:
        self.carried_loss, self.carried_losses = carried["loss"], carried["losses"]

    def local_means(self) -> dict:
        """This rank's means per step (phase names with ``_s``), the mean loss and
        the comm-wait share of the step time."""
        steps, seconds, _, loss, *phases = (now - then for now, then in zip(self.totals.values, self.start))
        per_step = 1 / max(steps, 1)
        means = {f"{name}_s": value * per_step for name, value in zip(PHASES, phases)}
        means["step_s"] = seconds * per_step
        means["train_loss"] = (loss + self.carried_loss) / max(self.losses, 1)
        means["comm_wait_fraction"] = phases[PHASES.index("comm_wait")] / seconds if seconds else 0.0
        return means


def mean_over_ranks(values: dict, comm) -> dict:
    """Each value averaged over ranks, in one allreduce (every rank passes the same
    keys in the same order: they come from the same code)."""
    if comm.size == 1:
        return dict(values)
    array = np.array(list(values.values()), dtype=np.float64)
    comm.allreduce_(array, "sum")
    return {key: value / comm.size for key, value in zip(values, array.tolist())}


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: one JSON object per line, flushed as written.

    `keep_lines`: None starts a new file; a number continues a resumed run's file,
    first dropping lines written after its checkpoint, so the file reads as if the
    run had never stopped."""

    def __init__(self, path: str, keep_lines: int | None):
        self.path = path
        if keep_lines is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                lines = file.readlines()
            if len(lines) > keep_lines:
                write_text_durably(path, "".join(lines[:keep_lines]))
            self.lines = min(len(lines), keep_lines)
            self._file = open(path, "a", encoding="utf-8")
        else:
            self.lines = 0
            self._file = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (for plots and tests). A last line without its
    newline is one the running job is still writing, and is left out."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.endswith("\n") and line.strip()]
