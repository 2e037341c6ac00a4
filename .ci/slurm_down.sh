#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started, by the pids it recorded (never by name), and remove its env file.
set -uo pipefail

STATE_DIR="${QUESTA_SLURM_DIR:-/tmp/questa-slurm}"
ENV_FILE="${QUESTA_SLURM_ENV:-$STATE_DIR/slurm.env}"
[[ -f "$ENV_FILE" ]] || exit 0
# shellcheck disable=SC1090
source "$ENV_FILE"

for pid in ${SLURMD_PID:-} ${SLURMCTLD_PID:-} ${MUNGED_PID:-}; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
done
rm -f "$ENV_FILE"
