#!/usr/bin/env bash
# The images' entrypoint.
#   check [N]    distprop launch --check on N ranks (default: one per GPU, else 2)
#   anything else runs as given: distprop launch ..., or sshd for an MPIJob worker
set -euo pipefail

# In an MPIJob's launcher pod (the MPI Operator sets K_MPI_JOB_ROLE and the hostfile's
# path), first wait until every worker's name resolves: the DNS records of pods that
# just became ready can lag behind them, and mpirun would fail on an unknown host.
if [ "${K_MPI_JOB_ROLE:-}" = launcher ]; then
  hostfile="${OMPI_MCA_orte_default_hostfile:-/etc/mpi/hostfile}"
  while read -r host _; do
    host="${host%%:*}"  # Open MPI's 'host slots=N' or MPICH's 'host:N'
    [ -n "$host" ] || continue
    for wait in 1 2 4 8 16 32; do
      getent hosts "$host" >/dev/null && break
      echo "entrypoint: $host does not resolve yet; trying again in ${wait}s" >&2
      sleep "$wait"
    done
  done < "$hostfile"  # a name that never resolves is reported by distprop launch as an unknown host
fi

if [ "${1:-check}" != check ]; then
  exec "$@"
fi
ranks="${2:-}"
if [ -z "$ranks" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  ranks=2  # no GPU: two ranks, enough to see an allreduce cross processes
fi
if [ -n "$ranks" ]; then
  exec distprop launch --check -n "$ranks"
fi
exec distprop launch --check
