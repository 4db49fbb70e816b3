#!/usr/bin/env bash
# Set up (once), lint, and run the whole test suite (serial tests + MPI tests at 1, 2 and 4 ranks).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash jobs/local/setup.sh
# Job scripts are linted by the tests; SLURM itself is installed by jobs/local/start-slurm.sh.
if ! command -v shellcheck >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends shellcheck) >/dev/null 2>&1 \
    || echo "note: could not install shellcheck; its tests will be skipped"
fi
.venv/bin/ruff check hpcpipe tests benchmarks examples
.venv/bin/ruff format --check hpcpipe tests benchmarks examples
exec .venv/bin/python -m pytest -q tests "$@"
