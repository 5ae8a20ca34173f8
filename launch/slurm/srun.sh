#!/usr/bin/env bash
# Slurm, ranks started by srun itself (PMIx): 2 nodes x 4 GPUs, one rank per GPU.
#   sbatch launch/slurm/srun.sh            (edit the #SBATCH lines and the paths first)
#SBATCH --job-name=distprop
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# The Python environment with distprop and an mpi4py built against the site's MPI
# (see launch/README.md), on a filesystem every node sees.
# shellcheck source=/dev/null
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# Data. Every rank reads its shard of the training set every epoch; on a shared
# filesystem (Lustre, GPFS, NFS) many nodes reading at once is often the
# bottleneck. Copy the dataset once per node to node-local scratch and read it
# there; leave DATA on the shared filesystem if it does not fit on the node.
SHARED_DATA="$HOME/datasets/cifar10"            # train/ and test/ in distprop's Parquet format
DATA="${SLURM_TMPDIR:-/tmp/$USER.$SLURM_JOB_ID}/cifar10"
# One task per node: srun would otherwise take the job's task count from sbatch.
once_per_node=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task=1)
srun "${once_per_node[@]}" mkdir -p "$DATA"
srun "${once_per_node[@]}" cp -r "$SHARED_DATA/." "$DATA/"
# Outputs (checkpoints, metrics) go to the shared filesystem: rank 0 writes them.
OUT="$PWD/runs/$SLURM_JOB_ID"

# Preflight: one line per rank, an allreduce and a broadcast verified, bandwidth.
distprop launch --check

# The job. srun needs Slurm built with PMIx (`srun --mpi=list` shows pmix):
#   --gpus-per-task=1 --gpu-bind=closest  each rank sees one GPU, the one nearest its cores
#   --cpus-per-task --cpu-bind=cores      each rank pinned to 8 cores: its BLAS and loader threads
#                                         (srun no longer takes --cpus-per-task from sbatch)
#   --kill-on-bad-exit=1                  one failing rank ends the job instead of leaving the others waiting
srun --mpi=pmix --kill-on-bad-exit=1 --gpus-per-task=1 --gpu-bind=closest \
     --cpus-per-task="$SLURM_CPUS_PER_TASK" --cpu-bind=cores \
     distprop train --model resnet20 --data "$DATA" --out "$OUT" --epochs 30
