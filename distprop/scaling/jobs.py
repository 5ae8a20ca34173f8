"""Starting the jobs an experiment is made of: through `distprop launch`, on this
machine or across the hosts of --hostfile/--hosts, each with a hard timeout and a
one-line error when it fails."""

from __future__ import annotations

import os
import subprocess
import sys

from distprop.errors import UserError


def launch_command(ranks: int, program: list[str], args) -> list[str]:
    """`distprop launch -n ranks ... -- program`; more ranks than this machine's
    cores are oversubscribed when no hosts are given."""
    command = [sys.executable, "-m", "distprop", "launch", "-n", str(ranks)]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    elif args.hosts:
        command += ["--hosts", args.hosts]
    elif ranks > (os.cpu_count() or 1):
        command.append("--oversubscribe")
    return command + ["--", *program]


def run(command: list[str], what: str, timeout: float) -> None:
    from distprop.launcher import job_environment

    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=job_environment(PYTHONUNBUFFERED=1))
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} did not finish within {timeout:g} s (--timeout)") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise UserError(f"{what} failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}")
