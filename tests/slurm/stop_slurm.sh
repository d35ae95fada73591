#!/usr/bin/env bash
# Stop the slurmd and slurmctld that tests/slurm/start_slurm.sh DIR started, by their pid files (munged is left
# running: it is shared by the machine). Safe to call twice.
set -uo pipefail
DIR="${1:?usage: stop_slurm.sh DIR}"
for name in slurmd slurmctld; do
    pidfile="$DIR/$name.pid"
    [ -s "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
done
exit 0
