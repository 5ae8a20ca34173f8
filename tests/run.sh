#!/usr/bin/env bash
# The whole test suite: single-process tests, then the MPI tests under 1, 2 and 3
# ranks. Every MPI job has a hard timeout, so a hang fails instead of freezing.
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

python -m pytest -q "$@"
for ranks in 1 2 3; do
  echo "== MPI tests on $ranks ranks"
  timeout -k 10 900 "$mpiexec" $oversubscribe -n "$ranks" \
    python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests/
done
