#!/usr/bin/env bash
# Set up (once), lint, and run the whole test suite (serial tests + MPI tests at 1, 2 and 4 ranks).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash jobs/local/setup.sh
.venv/bin/ruff check hpcpipe tests benchmarks
.venv/bin/ruff format --check hpcpipe tests benchmarks
exec .venv/bin/python -m pytest -q tests "$@"
