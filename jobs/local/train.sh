#!/usr/bin/env bash
# Set up (once), train the default small GPT on 4 pipeline ranks on this machine, save a
# checkpoint at the end (checkpoints/gpt-small) and print a short sample from it.
# Extra arguments go to `hpcpipe train`, e.g.  jobs/local/train.sh --schedule gpipe --steps 20
#   HPCPIPE_RUN=DIR   the checkpoint folder (default checkpoints/gpt-small)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash jobs/local/setup.sh
ranks=${HPCPIPE_RANKS:-4}
run=${HPCPIPE_RUN:-checkpoints/gpt-small}
bash jobs/local/mpirun.sh "$ranks" .venv/bin/hpcpipe train \
    --config jobs/configs/gpt-small.toml --pp "$ranks" --metrics "checkpoints/metrics.jsonl" \
    --checkpoint.dir="$run" --checkpoint.at_end=true "$@"
# The sample is a bonus: training succeeded and its checkpoint is saved whatever happens here.
echo "sample from $run:"
if ! .venv/bin/hpcpipe generate --checkpoint "$run" --prompt "def " --max-new-tokens 64 \
        --temperature 0.8 --top-k 40 --seed 1; then
    echo "train.sh: no sample (hpcpipe generate failed); the checkpoint is in $run" >&2
fi
