"""The no-communication baseline: every rank of a job runs `distprop train` as a
job of its own -- same model, data, per-rank batch and threads, no gradient
exchange -- at the same time as the others, so they contend for the machine's
cores and memory bandwidth as the ranks of a real job do.

    distprop launch -n 4 -- python -m distprop.scaling.independent --threads 1 -- TRAIN FLAGS...

Rank r writes to OUT/rank-r (OUT: the --out among the train flags). Started first,
distprop's runtime takes MPI_COMM_SELF as the job: `distprop train`'s own init
then finds a one-rank job already started.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distprop.scaling.independent")
    parser.add_argument("--threads", type=int, required=True, help="threads for this rank's training")
    parser.add_argument("train", nargs=argparse.REMAINDER, help="-- the flags for distprop train (with --out)")
    args = parser.parse_args(argv)
    flags = args.train[1:] if args.train[:1] == ["--"] else list(args.train)
    if "--out" not in flags:
        parser.error("the train flags need --out OUT (each rank writes OUT/rank-N)")
    from mpi4py import MPI

    from distprop.parallel import runtime

    rank = MPI.COMM_WORLD.Get_rank()
    where = flags.index("--out") + 1
    flags[where] = os.path.join(flags[where], f"rank-{rank}")
    runtime.init(mpi_comm=MPI.COMM_SELF, threads=args.threads)
    from distprop.cli import main as distprop_main

    return distprop_main(["train", *flags])


if __name__ == "__main__":
    sys.exit(main())
