"""`distprop train`: flags (and `--config job.toml`) -> a resolved config -> the job.

A mistake in the flags or the config file ends the command with status 2 and one
line, printed by rank 0 only (under mpiexec every rank reaches the same verdict
from the same arguments, and every rank exits), before MPI is even started.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from distprop.errors import UserError
from distprop.train.config import OPTIONS, closest_option, from_toml, load_toml, parse_flag, resolve_config

PROG = "distprop train"
_QUIET_RANK_DELAY_S = 1.0
# Set by MPI launchers and Slurm before MPI starts: who prints a config error.
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report(message: str) -> None:
    """Rank 0 prints the error. The others, which reached the same verdict, wait a
    moment before exiting: a launcher ends the whole job when the first rank exits
    with an error, and rank 0's line must get out before that."""
    if launcher_rank() == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(_QUIET_RANK_DELAY_S)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train a model data-parallel on every rank of the MPI job it runs in (or alone): "
                          "evaluation, metrics.jsonl, checkpoints and exact resume.")
    parser.allow_abbrev = False  # --lr must never silently mean --lr-step-size
    parser.add_argument("--config", metavar="TOML", default=argparse.SUPPRESS,
                        help="a TOML file with any of the options below (flags override it)")
    for name, option in OPTIONS.items():
        meta = option.metadata
        default = option.default_factory() if option.default is dataclasses.MISSING else option.default
        shown = "" if default is None else f" (default: {default})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=meta["help"].replace("%", "%%") + shown)
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "resume":
            kwargs.update(nargs="?", const="latest", metavar="PATH")
        elif meta["is_list"]:
            kwargs.update(nargs="+", metavar=meta["type"].__name__.upper())
        else:
            kwargs["metavar"] = meta["metavar"] or (meta["choices"] and "{" + ",".join(meta["choices"]) + "}") or \
                meta["type"].__name__.upper()
        parser.add_argument(flag(name), **kwargs)
    _one_line_errors(parser)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own errors (a missing value, an unknown flag) as one line with exit
    status 2, the closest valid flag suggested; rank 0 prints them."""

    def error(message: str):
        report(message)
        sys.exit(2)

    parse_known_args = parser.parse_known_args

    def strict_parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        if extras:
            unknown = extras[0]
            close = closest_option(unknown.lstrip("-").split("=")[0]) if unknown.startswith("--") else None
            hint = f" (did you mean {flag(close)}?)" if close else ""
            error(f"unknown option {unknown}{hint}" if unknown.startswith("-") else f"unexpected argument {unknown}")
        return namespace, extras

    parser.error = error
    parser.parse_known_args = strict_parse_known_args


def _check_gpu() -> None:
    from distprop import backend

    if not backend.gpu_available():
        raise UserError("device 'gpu': cupy is not installed or sees no GPU (pip install 'distprop[gpu]')")


def config_from_args(args):
    """The resolved TrainConfig: defaults < the TOML file < flags."""
    file_values = {}
    if getattr(args, "config", None) is not None:
        file_values = from_toml(load_toml(args.config), args.config)
    flags = {name: parse_flag(name, getattr(args, name), flag(name)) for name in OPTIONS if hasattr(args, name)}
    return resolve_config(file_values, flags)


def run(args) -> int:
    try:
        config = config_from_args(args)
        if config.device == "gpu":
            _check_gpu()
    except UserError as error:
        report(str(error))
        return 2
    from distprop.train.job import interrupted_message, run_job, start

    comm, device = start(config)
    try:
        run_job(config, comm, device)
    except UserError as error:  # agreed on by every rank before it was raised
        if comm.rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: where to go on from, not a traceback
        if comm.rank == 0:
            print(f"{PROG}: {interrupted_message(config.out)}", file=sys.stderr, flush=True)
        if comm.size > 1:  # other ranks may wait in a collective this rank will never join
            comm.abort(130)
        return 130
    return 0
