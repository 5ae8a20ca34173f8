#!/usr/bin/env bash
# GPU checks on a machine with cupy, NCCL and PyTorch on CUDA: the suite on cupy
# arrays, the data-parallel tests with 2 ranks sharing the GPU, and the step
# benchmark against PyTorch on CUDA. Usage: bash benchmarks/gpu_check.sh [seconds]
set -uo pipefail
budget="${1:-600}"
export PYTHONUNBUFFERED=1 DISTPROP_WATCHDOG_TIMEOUT=60
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
python=${PYTHON:-python3}
mpiexec=${MPIEXEC:-mpiexec}
nvidia-smi -L
$python -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"

echo "== single-process suite on cupy arrays"
timeout $((budget / 3)) $python -m pytest -q -x --device gpu -p no:cacheprovider \
  tests/test_parallel_gpu.py tests/test_autograd.py tests/test_functional_linear.py \
  tests/test_functional_losses.py tests/test_functional_conv.py tests/test_functional_normalization.py \
  tests/test_functional_pooling.py tests/test_functional_attention.py tests/test_functional_arithmetic.py \
  tests/test_nn_layers.py 2>&1 | tail -15
echo "== data-parallel tests, 2 ranks on one GPU"
timeout $((budget / 4)) "$mpiexec" --oversubscribe -n 2 $python -m pytest -q -x --with-mpi --device gpu \
  -p no:cacheprovider tests/test_parallel_mpi.py 2>&1 | grep -a -E "passed|failed|Error|error" | tail -6
echo "== step benchmark against PyTorch on CUDA"
timeout $((budget / 4)) $python -m distprop bench step --device gpu --threads 1 --rounds 3 2>&1 | tail -8
