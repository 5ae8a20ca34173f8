"""`distprop launch`: start N processes through the installed MPI (or Slurm's srun),
printing the exact command it runs; `--check` for a cluster's first job."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from distprop.errors import UserError
from distprop.launcher import process
from distprop.launcher.plan import Request, plan
from distprop.parallel import exit_markers

EXAMPLES = """examples:
  distprop launch -n 2 -- python train.py
  distprop launch --check -n 2
  distprop launch --hostfile hosts --ppn 4 --gpus-per-node 4 -- distprop train --config run.toml
  distprop launch -n 8 --hosts node1:4,node2:4 --env NCCL_DEBUG=INFO --dry-run -- python train.py
inside a Slurm allocation the allocation's nodes are used (srun --mpi=pmix where it works)."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-n", "--np", dest="ranks", type=_positive, metavar="N",
                        help="processes in all (default: per node x nodes, else every slot, else one per GPU)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", metavar="FILE",
                       help="hosts, one a line: 'host slots=N' (Open MPI) or 'host:N' (MPICH); bare 'host' = 1 slot")
    where.add_argument("--hosts", metavar="H:N,...", help="hosts and slots, e.g. node1:4,node2:4")
    parser.add_argument("--ppn", dest="per_node", type=_positive, metavar="K", help="processes per node")
    parser.add_argument("--gpus-per-node", type=_positive, metavar="G",
                        help="one process per GPU: G per node (found by itself on this machine)")
    parser.add_argument("--bind", choices=("none", "core", "socket"), default="none",
                        help="pin each rank: none (default; it takes its share of the node's cores), "
                             "core (its share of cores, pinned), socket")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="pass a variable to every rank (repeatable)")
    parser.add_argument("--oversubscribe", action="store_true", help="allow more ranks than slots")
    parser.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                        help="auto: srun --mpi=pmix inside Slurm where it works, else mpiexec")
    parser.add_argument("--mpiexec", metavar="PATH", help="this mpiexec instead of the one found")
    parser.add_argument("--mpiexec-args", default="", metavar="'ARGS'",
                        help="more arguments for mpiexec/srun, as one string, e.g. '--mca pml ucx'")
    parser.add_argument("--dry-run", action="store_true", help="print the command and stop")
    parser.add_argument("--check", action="store_true",
                        help="run the preflight: one line per rank, allreduce and broadcast verified, bandwidth")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...: what every rank runs")


def request_from(args) -> Request:
    command = args.program[1:] if args.program[:1] == ["--"] else list(args.program)
    if args.check:
        if command:
            raise UserError("--check runs its own program: drop the command after it")
        command = [sys.executable, "-m", "distprop.launcher.check"]
    elif not command:
        raise UserError("nothing to run: give the command after --, e.g. distprop launch -n 2 -- python train.py")
    return Request(command=command, ranks=args.ranks, hostfile=args.hostfile, hosts=args.hosts,
                   per_node=args.per_node, gpus_per_node=args.gpus_per_node, bind=args.bind, env=args.env,
                   oversubscribe=args.oversubscribe, launcher=args.launcher, mpiexec=args.mpiexec,
                   mpiexec_args=args.mpiexec_args)


def run(args) -> int:
    request = request_from(args)
    with tempfile.TemporaryDirectory(prefix="distprop-launch-") as workdir:
        launch = plan(request, os.environ, Path(workdir))
        for note in launch.notes:
            print(f"distprop launch: {note}", file=sys.stderr)
        if args.dry_run:
            print(launch.line)
            if launch.hostfile:
                path, text = launch.hostfile
                print(f"# {path} (written for the run):\n" + "".join(f"#   {line}\n" for line in text.splitlines()),
                      end="")
            return 0
        print(f"distprop launch: {launch.line}", file=sys.stderr, flush=True)
        markers = os.path.join(workdir, "exit-markers")
        os.mkdir(markers)
        code = process.run(launch.argv, {**os.environ, **launch.assignments, exit_markers.VARIABLE: markers},
                           failed_anyway=lambda: bool(exit_markers.unfinished(markers)))
        killed = exit_markers.unfinished(markers)
        if code == 0 and killed:  # e.g. Open MPI 5 after a host's processes were killed
            print(f"distprop launch: rank(s) {', '.join(map(str, killed))} started but never returned from "
                  f"the program (killed?), although {launch.argv[0]} exited with status 0", file=sys.stderr)
            return 1
        return code
