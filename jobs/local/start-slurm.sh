#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (localhost), for trying and testing the job
# scripts in jobs/slurm/. Idempotent: a second run finds it up and only prints the export line.
#
#   bash jobs/local/start-slurm.sh          # installs slurm + munge with apt-get if missing (root)
#   export SLURM_CONF=/tmp/hpcpipe-slurm/slurm.conf      # the line it prints last
#   sbatch jobs/slurm/train.sbatch; squeue; sinfo
#   bash jobs/local/start-slurm.sh stop     # stop the daemons it started
#
# Everything (config, munge key and socket, state, pids, logs) lives under HPCPIPE_SLURM_DIR
# (default /tmp/hpcpipe-slurm); nothing in /etc is changed and no system service is started.
# Environment: HPCPIPE_SLURM_DIR, HPCPIPE_SLURM_PORT (slurmctld port; slurmd uses PORT+1),
#              HPCPIPE_SLURM_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

dir=${HPCPIPE_SLURM_DIR:-/tmp/hpcpipe-slurm}
port=${HPCPIPE_SLURM_PORT:-6817}
deadline_s=${HPCPIPE_SLURM_TIMEOUT:-60}
conf=$dir/slurm.conf
sock=$dir/munge/munge.socket.2
export SLURM_CONF=$conf

say() { echo "start-slurm: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

alive() {  # alive PIDFILE: true if the process in the pid file runs (and is not a zombie)
  local pid
  [ -s "$1" ] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null \
    && ! grep -q '^[^)]*) Z' "/proc/$pid/stat" 2>/dev/null
}

stop_one() {  # stop_one PIDFILE NAME
  if alive "$1"; then
    say "stopping $2 (pid $(cat "$1"))"
    kill "$(cat "$1")" 2>/dev/null || true
    for _ in $(seq 50); do alive "$1" || break; sleep 0.1; done
  fi
  rm -f "$1"
}

if [ "${1:-}" = stop ]; then
  stop_one "$dir/slurmd.pid" slurmd
  stop_one "$dir/slurmctld.pid" slurmctld
  stop_one "$dir/munge/munged.pid" munged
  exit 0
fi

node_idle() {  # the node is up and can take jobs (idle, or busy with jobs: mix/alloc)
  local state
  state=$(sinfo -h -N -n localhost -o %T 2>/dev/null | head -n1) || return 1
  case $state in idle* | mix* | alloc* | completing*) return 0 ;; *) return 1 ;; esac
}

# Already up? Then there is nothing to do.
if [ -f "$conf" ] && alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid" \
  && alive "$dir/munge/munged.pid" && command -v sinfo >/dev/null && node_idle; then
  say "already running ($dir)"
  echo "export SLURM_CONF=$conf"
  exit 0
fi

# ---- 1. packages --------------------------------------------------------------------------
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "${pair%%:*}" \
    >/dev/null || missing+=("${pair#*:}")
done
export PATH=$PATH:/usr/sbin:/sbin
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them as root: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get on this machine"
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # The packages do not start their services in a container without systemd.
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"${TMPDIR:-/tmp}/start-slurm-apt.log" 2>&1; then
    say "apt-get install failed; running apt-get update and trying again"
    apt-get update -q >>"${TMPDIR:-/tmp}/start-slurm-apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"${TMPDIR:-/tmp}/start-slurm-apt.log" 2>&1 \
      || die "apt-get install ${pkgs[*]} failed; see ${TMPDIR:-/tmp}/start-slurm-apt.log"
  fi
fi
[ "$(id -u)" -eq 0 ] || die "slurmd must start as root (run this script as root)"
id munge >/dev/null 2>&1 || die "no user 'munge' (the munge package creates it)"

# ---- 2. stop what a previous run left, then write the configuration -----------------------
stop_one "$dir/slurmd.pid" slurmd
stop_one "$dir/slurmctld.pid" slurmctld
stop_one "$dir/munge/munged.pid" munged
mkdir -p "$dir"/{state,spool,log,munge}
chmod 0755 "$dir"
chown munge:munge "$dir/munge"
chmod 0755 "$dir/munge"            # munged: the socket dir must be searchable by all
if [ ! -s "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chown munge:munge "$dir/munge/munge.key"
chmod 0400 "$dir/munge/munge.key"

# NOTE: nproc obeys OMP_NUM_THREADS (mpirun.sh and hpcpipe set it to 1): a node of 1 CPU
# would leave every 2-task job pending forever. Count the CPUs this process may run on.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
user=$(id -un)
cat >"$conf" <<EOF
# One-node SLURM on localhost for hpcpipe (written by jobs/local/start-slurm.sh).
ClusterName=hpcpipe
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# ---- 3. start munged, slurmctld, slurmd ----------------------------------------------------
say "starting munged (socket $sock)"
runuser -u munge -- munged --socket="$sock" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
  --seed-file="$dir/munge/munged.seed" \
  || die "munged did not start; see $dir/munge/munged.log"
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done

say "starting slurmctld and slurmd (SLURM_CONF=$conf)"
# -c: start clean (no jobs from a previous run); -i: ignore state-file errors.
slurmctld -c -i -f "$conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
slurmd -N localhost -f "$conf" || die "slurmd did not start; see $dir/log/slurmd.log"

# ---- 4. wait for the node -------------------------------------------------------------------
end=$((SECONDS + deadline_s))
until node_idle; do
  if [ $SECONDS -ge $end ]; then
    sinfo -N 2>&1 | sed 's/^/  /' >&2 || true
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    die "node localhost not idle after ${deadline_s}s"
  fi
  # A node left DOWN/DRAIN by an earlier run comes back with RESUME.
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  sleep 0.5
done
say "node localhost is idle ($cpus CPUs, partition debug)"
echo "export SLURM_CONF=$conf"
