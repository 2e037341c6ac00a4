#!/usr/bin/env bash
# Wait, inside one device call, on a run that bench/smollm2_arms.sh started with
# DETACH=1, then bring its output folder back as one archive ($OUT/results.tar.gz: a device call returns at
# most 8 files).
# Usage: bash bench/device_wait.sh RUN_OUT [SECONDS]   (RUN_OUT: the detached run's $OUT; default 540 s)
set -uo pipefail
DIR=${1:?usage: bench/device_wait.sh RUN_OUT [SECONDS]}
END=$(( $(date +%s) + ${2:-540} ))
while [ ! -f "$DIR/done" ] && [ "$(date +%s)" -lt "$END" ]; do sleep 5; done
if [ -f "$DIR/done" ]; then echo "device_wait: the run has ended"; else echo "device_wait: still running"; fi
grep -v -E '^\s*$' "$DIR/run.log" | tail -n 40
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/results.tar.gz" -C "$DIR" . && ls -la "$OUT"; fi
