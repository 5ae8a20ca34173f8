#!/usr/bin/env bash
# PBS Pro / OpenPBS: 2 nodes x 4 GPUs, one rank per GPU, started by mpiexec.
#   qsub launch/pbs/mpiexec.sh             (edit the #PBS lines and the paths first)
#PBS -N distprop
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l place=scatter
#PBS -l walltime=02:00:00
#PBS -j oe
set -euo pipefail
cd "$PBS_O_WORKDIR"

# The Python environment with distprop, on a filesystem every node sees.
# shellcheck source=/dev/null
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# $PBS_NODEFILE lists each node once per MPI process (mpiprocs): 8 lines here.
# Never edit it; distprop launch reads it as 4 slots on each of the 2 nodes.
ranks="$(wc -l < "$PBS_NODEFILE")"
per_node=4

# Data: node-local scratch is fastest to read (copy once per node, see
# launch/slurm/srun.sh); outputs go to the shared filesystem, where rank 0 writes.
DATA="$HOME/datasets/cifar10"
OUT="$PBS_O_WORKDIR/runs/${PBS_JOBID%%.*}"

# Preflight: one line per rank, allreduce and broadcast verified, bandwidth.
distprop launch --check --hostfile "$PBS_NODEFILE" --ppn "$per_node"

# The job. distprop launch speaks the installed mpiexec's dialect and prints the
# line it runs; --bind core pins each rank to its share of a node's cores.
distprop launch --hostfile "$PBS_NODEFILE" -n "$ranks" --ppn "$per_node" --bind core -- \
    distprop train --model resnet20 --data "$DATA" --out "$OUT" --epochs 30

# The same with the site's mpiexec directly (its nodes come from PBS itself):
#   Open MPI built with PBS (tm) support:
#     mpiexec -n "$ranks" --map-by "ppr:$per_node:node:PE=8" --bind-to core \
#         launch/gpu_per_rank.sh distprop train ...
#   HPE Cray PALS (e.g. ALCF Polaris):
#     mpiexec -n "$ranks" --ppn "$per_node" --depth 8 --cpu-bind depth \
#         launch/gpu_per_rank.sh distprop train ...
