"""What rank 0 shows while a job runs: a tqdm bar on a terminal, plain log lines
otherwise (a batch job's log file must stay readable: a bar redrawn with carriage
returns piles up there). Other ranks stay quiet unless verbose, and then print
their own log lines, marked with their rank. tqdm's ``TQDM_*`` environment
variables (e.g. ``TQDM_MININTERVAL``) apply to the bar."""

from __future__ import annotations

import os
import sys


def choose_mode(requested: str, rank: int, verbose: bool) -> str:
    if rank != 0:
        return "log" if verbose and requested != "none" else "none"
    if requested == "auto":
        return "bar" if stdout_is_terminal() else "log"
    return requested


def stdout_is_terminal() -> bool:
    """Whether what is printed reaches a terminal. Open MPI's mpiexec hands every rank
    a pseudo-terminal as stdout whatever its own stdout is (a log file included), so
    under it the answer is unknown, and log lines are the safe choice there
    (`--progress bar` asks for the bar anyway)."""
    return sys.stdout.isatty() and "OMPI_COMM_WORLD_SIZE" not in os.environ


class Progress:
    def __init__(self, mode: str, rank: int, total_steps: int, first_step: int):
        self.mode, self.total = mode, total_steps
        self.prefix = f"[rank {rank}] " if rank else ""
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                            file=sys.stdout, leave=True)

    def epoch(self, epoch: int, epochs: int | None) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""), refresh=False)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict, epochs: int | None) -> None:
        """A training record: the bar's postfix, or one log line."""
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['train_loss']:.4f}  {record['samples_per_s']:,.0f} samples/s  "
                                     f"comm {record['comm_wait_fraction']:.0%}", refresh=False)
            return
        epoch = f"{record['epoch'] + 1}" + (f"/{epochs}" if epochs else "")
        phases = "  ".join(f"{label} {record[key] * 1e3:.2f}" for label, key in _PHASE_LABELS)
        self.message(f"epoch {epoch}  step {record['step']}/{self.total}  loss {record['train_loss']:.4f}  "
                     f"lr {record['lr']:.4g}  {record['samples_per_s']:,.0f} samples/s  "
                     f"comm {record['comm_wait_fraction']:.0%}  (ms/step: {phases})")

    def message(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(self.prefix + text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_PHASE_LABELS = (("data", "data_wait_s"), ("fwd", "forward_s"), ("bwd", "backward_s"), ("comm", "comm_wait_s"),
                 ("opt", "optimizer_s"))
