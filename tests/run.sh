#!/usr/bin/env bash
# The whole test suite: the single-process tests in a random order on two worker
# processes (pytest-xdist; the seed is printed, `--random-order-seed=N` repeats an
# order, `-n 0` runs them in this process), then the MPI tests on 2 and 3 ranks.
# Every MPI job has a hard timeout, so a hang fails instead of freezing. Arguments
# go to the single-process run. Skips other than GPU, platform and privilege ones
# fail the run (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then  # Open MPI refuses to start as root without these
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export DISTPROP_WATCHDOG_TIMEOUT="${DISTPROP_WATCHDOG_TIMEOUT:-120}"
mpiexec="$(dirname "$(command -v python)")/mpiexec"
[ -x "$mpiexec" ] || mpiexec=mpiexec
oversubscribe=""
if "$mpiexec" --version 2>&1 | grep -qi "open mpi\|openrte"; then oversubscribe="--oversubscribe"; fi

# Every stage runs even when an earlier one failed, so one run shows every failure.
start=$SECONDS
failed=()
# Many tests wait on jobs they start, so two workers take about 2/3 of the time of
# one. Each worker takes whole files (module-scoped fixtures, such as the network
# namespaces of the multi-host tests, are then set up once), the files and the tests
# in each in a random order; every worker must shuffle alike: one seed for all,
# chosen here unless given.
seed=(--random-order-seed="$RANDOM")
for argument in "$@"; do [[ "$argument" == --random-order-seed* ]] && seed=(); done
python -m pytest -q -n 2 --dist loadfile --random-order-bucket=module "${seed[@]}" "$@" \
  || failed+=("single-process tests")
# One rank has no reducer: the data-parallel tests mean something from two ranks on.
# Only the files that hold MPI tests are collected (importing the rest, PyTorch
# included, would cost each rank more than the tests take).
mapfile -t mpi_files < <(grep -l "mark\.mpi" tests/test_*.py)
for ranks in 2 3; do
  echo "== MPI tests on $ranks ranks"
  timeout -k 10 900 "$mpiexec" $oversubscribe -n "$ranks" python -m pytest -q --with-mpi -m mpi \
    -p no:cacheprovider "${mpi_files[@]}" || failed+=("MPI tests on $ranks ranks")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== tests/run.sh: FAILED: $(IFS=,; echo "${failed[*]}" | sed 's/,/, /g') ($((SECONDS - start)) s)"
  exit 1
fi
echo "== tests/run.sh: all passed in $((SECONDS - start)) s"
