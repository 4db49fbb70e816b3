#!/usr/bin/env bash
# Set up (once) and train the default small GPT on 4 pipeline ranks on this machine.
# Extra arguments go to `hpcpipe train`, e.g.  jobs/local/train.sh --schedule gpipe --steps 20
set -euo pipefail
cd "$(dirname "$0")/../.."
bash jobs/local/setup.sh
ranks=${HPCPIPE_RANKS:-4}
exec bash jobs/local/mpirun.sh "$ranks" .venv/bin/hpcpipe train \
    --config jobs/configs/gpt-small.toml --pp "$ranks" --metrics "checkpoints/metrics.jsonl" "$@"
