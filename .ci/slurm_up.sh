#!/usr/bin/env bash
# Start a real one-node Slurm (munged, slurmctld, slurmd) for tests/test_slurm.py, as docs/slurm.md
# describes. Installs Debian's slurm-wlm and munge when missing (CI runs as root with the Debian registry
# reachable). Writes KEY=VALUE lines (SLURM_CONF, the daemons' pids) to $QUESTA_SLURM_ENV, which the tests read
# and .ci/slurm_down.sh uses to stop exactly the daemons started here. When that file names a live slurmctld,
# the Slurm it describes is reused.
set -euo pipefail

STATE_DIR="${QUESTA_SLURM_DIR:-/tmp/questa-slurm}"
ENV_FILE="${QUESTA_SLURM_ENV:-$STATE_DIR/slurm.env}"
HOST="$(hostname -s)"

if [[ -f "$ENV_FILE" ]]; then
    # shellcheck disable=SC1090
    SLURMCTLD_PID="$(source "$ENV_FILE" && echo "${SLURMCTLD_PID:-}")"
    if [[ -n "$SLURMCTLD_PID" ]] && kill -0 "$SLURMCTLD_PID" 2>/dev/null; then
        echo "slurm_up: already running (slurmctld pid $SLURMCTLD_PID, env in $ENV_FILE)"
        exit 0
    fi
    rm -f "$ENV_FILE"  # left by a run whose daemons are gone
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

rm -rf "$STATE_DIR/state" "$STATE_DIR/spool"  # a clean start: no jobs from an earlier run
mkdir -p "$STATE_DIR"/{state,spool,log}

# munge: one key shared by the daemons and clients of this machine.
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom >/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
MUNGED_PID=""
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    setsid munged --foreground --force >"$STATE_DIR/log/munged.out" 2>&1 &
    MUNGED_PID=$!
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

# Leave 1 GiB of the machine's memory to the system; jobs get an even share per CPU unless they ask.
CPUS="$(nproc)"
MEM_MB=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
export SLURM_CONF="$STATE_DIR/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=questa-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
DefMemPerCPU=$((MEM_MB / CPUS))
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

setsid slurmctld -D -c -f "$SLURM_CONF" >"$STATE_DIR/log/slurmctld.out" 2>&1 &
SLURMCTLD_PID=$!
setsid slurmd -D -c -f "$SLURM_CONF" >"$STATE_DIR/log/slurmd.out" 2>&1 &
SLURMD_PID=$!

cat >"$ENV_FILE" <<EOF
SLURM_CONF=$SLURM_CONF
MUNGED_PID=$MUNGED_PID
SLURMCTLD_PID=$SLURMCTLD_PID
SLURMD_PID=$SLURMD_PID
EOF

for _ in $(seq 60); do
    if [[ "$(sinfo -h -o %t 2>/dev/null)" == "idle" ]]; then
        echo "slurm_up: node $HOST idle; env in $ENV_FILE"
        exit 0
    fi
    sleep 1
done
echo "slurm_up: node $HOST not idle after 60 s; logs in $STATE_DIR/log" >&2
sinfo >&2 || true
exit 1
