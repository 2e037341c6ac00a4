# Sourced by train.sbatch and eval.sbatch: run `questa-nemo <command> ...` once per node of the job through
# slurm/launch.py (which execs torchrun), inside the NeMo container or from a venv.
#
# Environment (slurm/submit.py sets it; `sbatch` passes the submitting shell's environment on):
#   QUESTA_IMAGE   container image (pyxis/enroot --container-image); the image built from our Dockerfile
#   QUESTA_MOUNTS  --container-mounts for data, runs and caches, e.g. /lustre/data:/data,/lustre/runs:/runs
#   QUESTA_VENV    bare metal: a venv with questa-nemo installed (used when QUESTA_IMAGE is empty)
#   QUESTA_WORKDIR the trainers' working directory in the container (--container-workdir; default
#                  $SLURM_SUBMIT_DIR); must lie inside QUESTA_MOUNTS
#   QUESTA_LOG_DIR where each restart's trainer output goes (default: $SLURM_SUBMIT_DIR/logs)
#   QUESTA_SLURM_DIR  this folder on a shared file system (default: $SLURM_SUBMIT_DIR/slurm)
# launch.py adds CUDA_DEVICE_MAX_CONNECTIONS=1, TORCH_NCCL_AVOID_RECORD_STREAMS=1 and NCCL_DEBUG=WARN to the
# trainers' environment unless already set (docs/slurm.md).

QUESTA_SLURM_DIR="${QUESTA_SLURM_DIR:-$SLURM_SUBMIT_DIR/slurm}"
CONTAINER_LAUNCHER=/opt/questa-nemo/slurm/launch.py  # where the Dockerfile puts this folder

questa_master_addr() {
    # The rendezvous host, resolved here on the batch host (a container may have no scontrol): the first of
    # `scontrol show hostnames`, which expands every hostlist form (node[01-04]-ib -> node01-ib, ...).
    # Exported as QUESTA_MASTER_ADDR; srun passes it to launch.py on every node.
    QUESTA_MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    if [[ -z "$QUESTA_MASTER_ADDR" ]]; then
        echo "questa: scontrol show hostnames gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
        exit 2
    fi
    export QUESTA_MASTER_ADDR
}

questa_log_file() {
    # This run's trainer output: one file per (re)start of the job, <job name>-<job id>-restart<N>.log.
    local dir="${QUESTA_LOG_DIR:-$SLURM_SUBMIT_DIR/logs}"
    mkdir -p "$dir"
    QUESTA_LOG="$dir/${SLURM_JOB_NAME:-questa}-${SLURM_JOB_ID}-restart${SLURM_RESTART_COUNT:-0}.log"
}

questa_launcher() {
    # The srun line that starts launch.py on every node, into the array LAUNCHER.
    questa_master_addr
    LAUNCHER=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
    if [[ -n "${QUESTA_IMAGE:-}" ]]; then
        LAUNCHER+=(--container-image="$QUESTA_IMAGE" --no-container-mount-home)
        LAUNCHER+=(--container-workdir="${QUESTA_WORKDIR:-$SLURM_SUBMIT_DIR}")
        [[ -n "${QUESTA_MOUNTS:-}" ]] && LAUNCHER+=(--container-mounts="$QUESTA_MOUNTS")
        LAUNCHER+=(python "$CONTAINER_LAUNCHER")
    elif [[ -n "${QUESTA_VENV:-}" ]]; then
        LAUNCHER+=("$QUESTA_VENV/bin/python" "$QUESTA_SLURM_DIR/launch.py")
    else
        echo "questa: set QUESTA_IMAGE (container) or QUESTA_VENV (bare metal)" >&2
        exit 2
    fi
}

questa_run() {
    # Run to completion; the exit status is the job's.
    questa_launcher
    questa_log_file
    echo "questa: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (rendezvous $QUESTA_MASTER_ADDR): questa-nemo $*"
    echo "questa: trainer output in $QUESTA_LOG"
    "${LAUNCHER[@]}" -- "$@" >>"$QUESTA_LOG" 2>&1
}

questa_run_preemptible() {
    # Run; on the pre-timeout signal (--signal=B:USR1@secs reaches this shell only) forward USR1 to every
    # process of the job steps, let the trainer save and exit 3, then requeue this job so it resumes from
    # that checkpoint. Also requeues when the trainer exits 3 for a signal that came another way.
    questa_launcher
    questa_log_file
    PREEMPTED=0
    trap 'PREEMPTED=1; echo "questa: USR1 received, asking the trainer to save"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    echo "questa: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \
        "(rendezvous $QUESTA_MASTER_ADDR): questa-nemo $*"
    echo "questa: trainer output in $QUESTA_LOG"
    "${LAUNCHER[@]}" -- "$@" >>"$QUESTA_LOG" 2>&1 &
    local pid=$! rc=0
    # A trapped signal interrupts `wait`; wait again until srun has really exited, then read its status.
    while ! wait "$pid" && kill -0 "$pid" 2>/dev/null; do :; done
    wait "$pid" || rc=$?
    if [[ $rc -eq 0 ]]; then
        return 0
    fi
    if [[ $rc -eq 3 || $PREEMPTED -eq 1 ]]; then
        echo "questa: trainer stopped (exit $rc) after saving; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$rc"
}
