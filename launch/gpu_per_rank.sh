#!/usr/bin/env bash
# Run a command on one GPU: the one of this rank's node-local rank.
#
#   mpirun -n 8 --map-by ppr:4:node launch/gpu_per_rank.sh distprop train ...
#
# distprop itself takes GPU (local rank mod GPUs) without this; the wrapper makes
# the choice at launch instead, so that the rank sees a single GPU (its device 0)
# and nothing it loads opens a context on another rank's GPU.
#   GPU_ORDER="3 2 1 0"  maps local ranks to GPUs in another order (on some nodes
#                        GPU 3 is the one closest to the first cores)
set -euo pipefail

# Each launcher names the node-local rank its own way; the first one set wins.
local_rank="${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${SLURM_LOCALID:-${PMI_LOCAL_RANK:-${PALS_LOCAL_RANKID:-${JSM_NAMESPACE_LOCAL_RANK:-}}}}}}"
if [ -z "$local_rank" ]; then
  echo "gpu_per_rank.sh: no node-local rank in the environment: start it with mpirun, mpiexec, srun or jsrun" >&2
  exit 1
fi

if [ -n "${GPU_ORDER:-}" ]; then
  read -r -a gpus <<< "$GPU_ORDER"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
  gpus=()
  for ((i = 0; i < count; i++)); do gpus+=("$i"); done
fi
if [ "${#gpus[@]}" -eq 0 ]; then
  echo "gpu_per_rank.sh: no GPU visible on $(hostname) (local rank $local_rank)" >&2
  exit 1
fi

export CUDA_VISIBLE_DEVICES="${gpus[local_rank % ${#gpus[@]}]}"
exec "$@"
