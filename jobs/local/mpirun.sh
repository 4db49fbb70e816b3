#!/usr/bin/env bash
# mpiexec -n N ARGS... with what the pip Open MPI needs on a workstation (root, oversubscription).
# Usage: jobs/local/mpirun.sh N command [args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=$1; shift
exe=${HPCPIPE_MPIEXEC:-.venv/bin/mpiexec}
[ -x "$exe" ] || exe=$(command -v mpiexec)
flags=()
if "$exe" --version 2>/dev/null | grep -qi "open mpi"; then
  flags+=(--oversubscribe)              # more ranks than cores is normal on a laptop
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$exe" -n "$n" "${flags[@]}" "$@"
