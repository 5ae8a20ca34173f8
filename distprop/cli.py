"""The `distprop` command: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from distprop.errors import UserError

# name -> (module providing `configure(parser)` and `run(args) -> int`, help line)
COMMANDS = {
    "train": ("distprop.train.cli", "run a data-parallel training job: config, evaluation, checkpoints, resume"),
    "launch": ("distprop.launcher.cli", "start N processes through the installed MPI, or check a cluster (--check)"),
    "scale": ("distprop.scaling.cli", "scaling experiments: sweeps over rank counts, predictions, plots"),
    "plot": ("distprop.train.plot", "draw loss, accuracy and throughput of one or more runs to PNG"),
    "data": ("distprop.data.cli", "datasets in distprop's Parquet format: converters, synthetic data, info"),
    "bench": ("distprop.bench.cli", "benchmarks that print ratios against a reference"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported and configured (the
    others are listed by name and help line), so one command's dependencies never
    slow down or break another."""
    parser = argparse.ArgumentParser(prog="distprop", description="Data-parallel training over MPI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line, description=help_line)
        command.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).configure(command)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    args._argv = argv  # a command may need to restart itself (see bench)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as error:
        print(f"distprop {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
