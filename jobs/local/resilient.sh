#!/usr/bin/env bash
# Train on this machine and relaunch after failures, shrinking the job when a rank was lost.
#
#   jobs/local/resilient.sh N [hpcpipe train args...]
#   jobs/local/resilient.sh 4 --config jobs/configs/gpt-small.toml --checkpoint.dir=ck \
#       --checkpoint.every=5
#
# Each attempt runs
#   jobs/local/mpirun.sh N .venv/bin/hpcpipe train --resume auto --parallel.elastic=true ARGS
# and looks at its exit code:
#    0  finished: stop.                      2  configuration error: stop (a retry cannot help).
#   99  checkpointed on a signal: relaunch with the same N (unless this script was signalled).
#   else  a rank died or the job aborted: relaunch with N-1 ranks (not below MIN_RANKS);
#         --parallel.elastic=true lets hpcpipe re-plan the layout for fewer ranks (dp replicas
#         go first, then pipeline stages), --resume auto continues from the newest checkpoint.
# Pass --checkpoint.dir (and --checkpoint.every) in ARGS, or every relaunch starts at step 0.
#
# Environment:
#   MIN_RANKS=1             never shrink below this
#   MAX_RESTARTS=5          relaunches after the first attempt
#   HPCPIPE_FAULT_FIRST_ONLY=1  HPCPIPE_FAULT (failure rehearsal) applies to the first attempt
#                           only (the default); 0 keeps it for every attempt
#   HPCPIPE_BIN=.venv/bin/hpcpipe
# Ctrl-C / SIGTERM / SIGUSR1 to this script: the ranks checkpoint and stop (exit 99), no relaunch;
# a second Ctrl-C / SIGTERM kills them.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 N [hpcpipe train args...]" >&2
  exit 2
fi
n=$1
shift
MIN_RANKS=${MIN_RANKS:-1}
MAX_RESTARTS=${MAX_RESTARTS:-5}
HPCPIPE_BIN=${HPCPIPE_BIN:-.venv/bin/hpcpipe}
[ -x "$HPCPIPE_BIN" ] || HPCPIPE_BIN=$(command -v hpcpipe) || {
  echo "resilient: no hpcpipe (run jobs/local/setup.sh)" >&2
  exit 2
}

log() { echo "resilient: $*" >&2; }

child=
stopping=
# shellcheck disable=SC2317  # called by the traps
on_signal() {
  if [ -n "$stopping" ]; then
    log "SIG$1 again: killing the job"
    if [ -n "$child" ]; then kill -s TERM "$child" 2>/dev/null; fi
    return
  fi
  stopping=$1
  log "SIG$1: asking the ranks to checkpoint and stop (no relaunch)"
  # USR1: Open MPI's mpiexec forwards it to the ranks; TERM would make it kill them at once.
  if [ -n "$child" ]; then kill -s USR1 "$child" 2>/dev/null; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1

attempt=0
while :; do
  attempt=$((attempt + 1))
  if [ $attempt -gt 1 ] && [ "${HPCPIPE_FAULT_FIRST_ONLY:-1}" = 1 ] && [ -n "${HPCPIPE_FAULT:-}" ]; then
    log "unsetting HPCPIPE_FAULT=$HPCPIPE_FAULT after the first attempt (HPCPIPE_FAULT_FIRST_ONLY=1)"
    unset HPCPIPE_FAULT
  fi
  log "attempt $attempt: $n rank(s)"
  # Background + wait: bash runs traps only between commands, so a foreground job would delay
  # them until it ended.
  bash jobs/local/mpirun.sh "$n" "$HPCPIPE_BIN" train --resume auto --parallel.elastic=true "$@" &
  child=$!
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break   # still alive: a trap interrupted `wait`
  done
  wait "$child" 2>/dev/null
  r=$?
  if [ $r -ne 127 ]; then rc=$r; fi
  child=

  case $rc in
    0)
      log "attempt $attempt finished the training (exit 0) on $n rank(s)"
      exit 0
      ;;
    2)
      log "configuration error (exit 2): not relaunching"
      exit 2
      ;;
  esac
  if [ -n "$stopping" ]; then
    log "stopped on SIG$stopping (exit $rc); resume later with the same arguments"
    exit "$rc"
  fi
  if [ $((attempt - 1)) -ge "$MAX_RESTARTS" ]; then
    log "exit $rc and $MAX_RESTARTS relaunches done (MAX_RESTARTS): giving up"
    exit "$rc"
  fi
  if [ "$rc" -eq 99 ]; then
    log "exit 99: checkpointed on a signal; relaunching on the same $n rank(s)"
  elif [ "$n" -gt "$MIN_RANKS" ]; then
    log "exit $rc: a rank was lost or the job aborted; relaunching on $((n - 1)) rank(s) (elastic)"
    n=$((n - 1))
  else
    log "exit $rc: relaunching on $n rank(s) (MIN_RANKS=$MIN_RANKS, cannot shrink further)"
  fi
done
