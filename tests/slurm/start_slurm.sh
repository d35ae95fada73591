#!/usr/bin/env bash
# Bring up a single-node Slurm cluster for the tests: munged, slurmctld and slurmd, from a minimal slurm.conf
# written to DIR (default: a new temp dir). Needs the Debian packages slurm-wlm and munge, and root.
#   source <(tests/slurm/start_slurm.sh [DIR])    # prints `export SLURM_CONF=DIR/slurm.conf` (and the dir) on success
#   tests/slurm/stop_slurm.sh DIR                 # stops the daemons by their pid files
# Ports: SLURM_TEST_PORT (default 6817) for slurmctld and SLURM_TEST_PORT + 1 for slurmd.
# Every failure names the missing piece on stderr and exits 1.
set -euo pipefail

fail() { echo "start_slurm: $*" >&2; exit 1; }
for bin in munged munge unmunge slurmctld slurmd sbatch squeue scontrol scancel srun sinfo; do
    command -v "$bin" >/dev/null || fail "'$bin' not found: install Slurm and munge (apt-get install -y slurm-wlm munge)"
done
[ "$(id -u)" = 0 ] || fail "must run as root (slurmctld and slurmd run as root here)"
[ -r /etc/munge/munge.key ] || fail "/etc/munge/munge.key is missing (the munge package creates it; or run mungekey)"

DIR="${1:-$(mktemp -d /tmp/slurm.XXXXXX)}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
PORT="${SLURM_TEST_PORT:-6817}"
HOST="$(hostname -s)"
CPUS="$(nproc)"

# munged: one per machine; reuse a running one.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --force || munged --force || fail "munged did not start"
    else
        munged --force || fail "munged did not start"
    fi
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null 2>&1 || fail "munge -n | unmunge does not report Success: munged is not working"
fi

cat > "$DIR/slurm.conf" <<CONF
ClusterName=drifttest
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
SchedulerParameters=sched_interval=2
MinJobAge=300
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
for _ in $(seq 60); do
    state="$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)"
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 0.5
done
case "$state" in
    idle*|mix*|alloc*) ;;
    *) fail "node $HOST is not idle after 30 s (sinfo: '${state:-no answer}'; see $DIR/log/slurmctld.log and slurmd.log)" ;;
esac
echo "export SLURM_CONF=$SLURM_CONF"
echo "# slurm dir: $DIR (node $HOST, $CPUS CPUs, port $PORT)"
