#!/usr/bin/env bash
# The images' entrypoint.
#   check [N]    distprop launch --check on N ranks (default: one per GPU, else 2)
#   anything else runs as given: distprop launch ..., or sshd for an MPIJob worker
set -euo pipefail

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
