#!/usr/bin/env bash
# LSF with jsrun (IBM Spectrum MPI, Summit-like nodes: 6 GPUs, 42 cores): 2 nodes,
# one rank per GPU.
#   bsub < launch/lsf/jsrun.sh             (edit the #BSUB lines and the paths first)
#BSUB -J distprop
#BSUB -P PROJECT123
#BSUB -nnodes 2
#BSUB -W 2:00
#BSUB -o distprop.%J.out
set -euo pipefail

# The Python environment with distprop and an mpi4py built against Spectrum MPI.
# shellcheck source=/dev/null
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# The compute nodes: every host of the job but the launch node.
nodes="$(sort -u "$LSB_DJOB_HOSTFILE" | grep -cv "^$(hostname)$" || true)"
DATA="$HOME/datasets/cifar10"                 # see launch/slurm/srun.sh on node-local copies
OUT="$PWD/runs/$LSB_JOBID"

# One resource set per GPU: 1 rank, 7 cores, 1 GPU; 6 sets per node. Each rank sees
# its one GPU as device 0, and `-b packed:7` pins it to its 7 cores.
jsrun --nrs "$((nodes * 6))" --tasks_per_rs 1 --cpu_per_rs 7 --gpu_per_rs 1 --rs_per_host 6 \
      --bind packed:7 python -m distprop.launcher.check
jsrun --nrs "$((nodes * 6))" --tasks_per_rs 1 --cpu_per_rs 7 --gpu_per_rs 1 --rs_per_host 6 \
      --bind packed:7 \
      distprop train --model resnet20 --data "$DATA" --out "$OUT" --epochs 30
