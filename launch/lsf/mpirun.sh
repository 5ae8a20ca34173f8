#!/usr/bin/env bash
# LSF with mpirun (Open MPI or MPICH): 8 ranks, 4 per node, one per GPU.
#   bsub < launch/lsf/mpirun.sh            (edit the #BSUB lines and the paths first)
#BSUB -J distprop
#BSUB -n 8
#BSUB -R "span[ptile=4]"
#BSUB -gpu "num=4:mode=exclusive_process"
#BSUB -W 2:00
#BSUB -o distprop.%J.out
set -euo pipefail

# The Python environment with distprop, on a filesystem every node sees.
# shellcheck source=/dev/null
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# $LSB_DJOB_HOSTFILE lists each host once per slot (4 lines per node here);
# distprop launch reads it as 4 slots per node and writes it out for the MPI.
DATA="$HOME/datasets/cifar10"                 # see launch/slurm/srun.sh on node-local copies
OUT="$PWD/runs/$LSB_JOBID"

# Preflight: one line per rank, allreduce and broadcast verified, bandwidth.
distprop launch --check --hostfile "$LSB_DJOB_HOSTFILE" --ppn 4

# The job; distprop launch prints the mpirun line it runs. (An Open MPI built with
# LSF support also finds the hosts itself: mpirun --map-by ppr:4:node ... .)
distprop launch --hostfile "$LSB_DJOB_HOSTFILE" --ppn 4 --bind core -- \
    distprop train --model resnet20 --data "$DATA" --out "$OUT" --epochs 30
