#!/usr/bin/env bash
# Issue 20 on a real LM, one GPU: SmolLM2-135M-Instruct on the hard word world (conf/smollm2_world.yaml: 8..10
# steps, counts up to 999), the three equal-compute arms of train.arms (plain / questa / adaptive) x SEEDS.
#   GGUF check -> import to an HF folder -> word-world data (JSONL; no `datasets` needed)
#   -> ONE warm-up per seed (stops by calibration), the seeds at once
#   -> every arm x seed as its own process on the one GPU, all at once (train.run_arms=[<arm>]: each reuses its
#      seed's warm-up and trains into run_dir/<arm>; same seed across arms, same token budget)
#   -> evaluation without hints, one process per model: the warm-up weights (the RL start) and
#      every arm's last checkpoint (pass@1/8/16 with standard errors) -> $OUT/results.json + table.md
#      (bench/arms_summary.py), curves.png, logs, metrics.
# Usage (repository root, GPU image; the device call that starts it, then calls that wait):
#   DETACH=1 OUT=$HOME/arms_out bash bench/smollm2_arms.sh GGUF [PART1 PART2] [key=value ...]
#   OUT=$OUT bash bench/device_wait.sh $HOME/arms_out 540
# (An absolute OUT outside the synced tree, where the next call still finds it. On our device machine the GGUF
# halves came in two calls' carry and were copied out of .gguf/ in between; the run of
# bench/results/smollm2_arms_h100 took 567 s after the machine started.)
# Overrides go to the data command and every trainer / eval process. Environment: SEEDS (default "1 2"),
# WARMUP_BUDGET_S (420: the warm-up does not stop on SIGTERM: a bound, not a cut; a check of 768 samples took
# ~30-40 s with three processes on one H100), ARMS_BUDGET_S (300: then
# SIGTERM, the trainer checkpoints and stops; the arm is evaluated on its last checkpoint and its tokens say
# how far it got), ARMS_RETRY_BUDGET_S (200: an arm that died, e.g. of GPU memory, or was cut before its
# token budget resumes from its last checkpoint once the others are done), EVAL_BUDGET_S (140), WARMUP_ONLY (1: stop after the warm-ups, their checks in $OUT), STEPS (steps cap of an arm where the trainer has no train.token_budget;
# default 20 ~ the token budget), THREADS (CPU threads per process, 2). Budget: ~1.5 min setup + import +
# data, warm-ups <= 300 s (~90 s when the stop comes early), arms <= 300 s, evaluation <= 140 s: <= ~14 min
# after the machine starts, ~10 min typically (one H100 run: 567 s).
# An arm the build cannot run (adaptive without algo.hints) is skipped and results.json says why.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${1:?usage: bench/smollm2_arms.sh GGUF [PART1 PART2] [key=value ...]}
shift
PARTS=()
while [ $# -gt 0 ] && [[ "$1" != *=* ]]; do PARTS+=("$1"); shift; done
OVERRIDES=("$@")
OUT=${OUT:-outputs/smollm2_arms_out}
RUN=${RUN:-runs/smollm2_arms}
SEEDS=${SEEDS:-"1 2"}
THREADS=${THREADS:-2}
START=$(date +%s)
stamp() { echo "[smollm2_arms +$(( $(date +%s) - START ))s] $*"; }

NAME=smollm2_arms
. bench/smollm2_common.sh
smollm2_gguf_ready

# DETACH=1: go on in a new process session from a copy of the repository outside the synced working tree, so
# the run outlives this device call (bench/device_wait.sh waits on $OUT/done). Output goes to $OUT/run.log.
if [ -n "${DETACH:-}" ]; then
  smollm2_detach smollm2_arms.sh "${DETACH_REPO:-$HOME/questa_nemo_arms}"
  exit 0
fi
mkdir -p "$OUT"
trap 'touch "$OUT/done"' EXIT

smollm2_gpu_env
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # 8 processes share the card
python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' \
  | tee "$OUT/device.txt"

M=$RUN/hf
if [ ! -f "$M/config.json" ]; then
  python3 -m questa_nemo.cli import "$GGUF" "$M" format=hf
fi
stamp "imported: $M"
# Up to 6 trainers share the card: each engine's KV cache takes a fixed small share of the free memory (the
# default 0.5 of it, taken by the first processes, left the later ones out of memory on the first H100 run:
# seed 1 adaptive and seed 2 plain died at start-up, bench/results/smollm2_arms_h100). Given overrides win.
COMMON=(model.hf_config="$M" model.checkpoint="$M" train.progress_bar=false
        rollout.kv_cache_memory_fraction="${KV_FRACTION:-0.06}" "${OVERRIDES[@]}")
DATA=$RUN/data
if [ -n "${WORLD_DATA:-}" ]; then  # built beforehand
  mkdir -p "$RUN" && rm -rf "$DATA" && cp -r "$WORLD_DATA" "$DATA"
elif [ ! -f "$DATA/warmup.jsonl" ]; then  # JSONL only where `datasets` is missing: the recipe reads JSONL
  python3 -m questa_nemo.data.word_world --config-name smollm2_world "${COMMON[@]}" world.output_dir="$DATA"
fi
stamp "word world written: $DATA"

# The arms this build can run (train.arms: a skipped arm, e.g. adaptive before algo.hints, says why), and
# whether the trainer stops on train.token_budget (else every arm runs STEPS steps).
python3 - "${COMMON[@]}" "train.run_dir=$RUN/seed0" "world.output_dir=$DATA" > "$OUT/arms_plan.txt" <<'EOF'
import dataclasses
import sys

from questa_nemo.config import TrainConfig, load_config
from questa_nemo.train.arms import plan_arms

cfg = load_config("smollm2_world", sys.argv[1:])
budget = "token_budget" in {f.name for f in dataclasses.fields(TrainConfig)}
print("budget" if budget else "steps")
for arm in plan_arms(cfg):
    print(arm.name, "skip" if arm.skipped else "run", (arm.skipped or "; ".join(arm.notes)).replace("\n", " "))
EOF
cat "$OUT/arms_plan.txt"
ARMS=$(awk 'NR > 1 && $2 == "run" {print $1}' "$OUT/arms_plan.txt" | tr '\n' ' ')
CAP=()
if [ "$(head -n 1 "$OUT/arms_plan.txt")" = steps ]; then CAP=(train.steps="${STEPS:-20}"); fi
for a in $(awk 'NR > 1 && $2 == "skip" {print $1}' "$OUT/arms_plan.txt"); do stamp "arm $a SKIPPED (see arms_plan.txt)"; done

run_all() {  # run_all BUDGET_S LABEL: the commands queued in JOBS, at once, each bounded; waits for all
  local budget=$1 label=$2 pids=() i=0
  for cmd in "${JOBS[@]}"; do
    log=${LOGS[$i]}
    # shellcheck disable=SC2086
    ( OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS timeout -k 45 --signal=TERM "$budget" bash -c "$cmd" \
        > "$log" 2>&1; echo $? > "$log.rc" ) &
    pids+=($!)
    i=$((i + 1))
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  stamp "$label: $(for l in "${LOGS[@]}"; do echo -n "$(basename "$(dirname "$l")")/$(basename "$l" .log)=$(cat "$l.rc") "; done)"
}
q() { printf '%q ' "$@"; }

# 1. one warm-up per seed (no arm: train.run_arms=[]), then the calibration table
JOBS=(); LOGS=()
for S in $SEEDS; do
  mkdir -p "$RUN/seed$S"
  JOBS+=("$(q python3 -m questa_nemo.cli train --config-name smollm2_world "${COMMON[@]}" "train.run_dir=$RUN/seed$S" \
    "world.output_dir=$DATA" "train.seed=$S" "train.run_arms=[]" train.final_eval=false)")
  LOGS+=("$RUN/seed$S/warmup.log")
done
run_all "${WARMUP_BUDGET_S:-420}" "warm-ups"
collect_outputs() {  # logs, warm-up checks, evaluations and metrics of every seed into $OUT
  local S A f
  for S in $SEEDS; do
    mkdir -p "$OUT/seed$S"
    cp "$RUN/seed$S"/*.log "$RUN/seed$S"/*.rc "$OUT/seed$S/" 2>/dev/null || true
    cp "$RUN/seed$S/warmup/warmup.json" "$RUN/seed$S/warmup/calibration.json" "$OUT/seed$S/" 2>/dev/null || true
    for f in "$RUN/seed$S"/eval_*/results.json; do
      if [ -f "$f" ]; then cp "$f" "$OUT/seed$S/$(basename "$(dirname "$f")").json"; fi
    done
    for A in $ARMS; do
      if [ -f "$RUN/seed$S/$A/metrics.jsonl" ]; then cp "$RUN/seed$S/$A/metrics.jsonl" "$OUT/seed$S/${A}_metrics.jsonl"; fi
    done
  done
  cp "$DATA/rl/manifest.json" "$OUT/data_manifest.json" 2>/dev/null || true
}
if [ -n "${WARMUP_ONLY:-}" ]; then  # calibrating the world / the warm-up's stop: its checks, no arms
  collect_outputs
  stamp "WARMUP_ONLY: warm-ups in $OUT"
  exit 0
fi

eval_job() {  # eval_job SEED LABEL CHECKPOINT: one model, without hints, into $RUN/seed<S>/eval_<label>
  JOBS+=("$(q python3 -m questa_nemo.cli eval --config-name smollm2_world "${COMMON[@]}" "train.run_dir=$RUN/seed$1" \
    "world.output_dir=$DATA" "eval.checkpoints=[$3]" "eval.labels=[$2]" "eval.output_dir=$RUN/seed$1/eval_$2")")
  LOGS+=("$RUN/seed$1/eval_$2.log")
}

# 2. every arm x seed at once, from its seed's warm-up
JOBS=(); LOGS=()
for S in $SEEDS; do
  [ -f "$RUN/seed$S/warmup/warmup.json" ] || { stamp "seed $S: no warm-up, no arms"; continue; }
  for A in $ARMS; do
    JOBS+=("$(q python3 -m questa_nemo.cli train --config-name smollm2_world "${COMMON[@]}" "train.run_dir=$RUN/seed$S" \
      "world.output_dir=$DATA" "train.seed=$S" "train.run_arms=[$A]" train.final_eval=false "${CAP[@]}")")
    LOGS+=("$RUN/seed$S/$A.log")
  done
done
[ ${#JOBS[@]} -gt 0 ] && run_all "${ARMS_BUDGET_S:-300}" "arms"

# 2b. an arm that died, or was cut by the time bound (rc 124) before its token budget, resumes from its last
#     checkpoint, now with fewer processes on the card, so every arm reaches the same generated tokens (one that
#     had reached its budget exits 0 and is not rerun): on the H100 run of bench/results/smollm2_arms_h100_run2
#     seed 2's questa died of GPU memory after step 15 of 24 (six ~13 GiB trainers on 80 GB), and six arms took
#     285 of their 300 s. ARMS_RETRY_BUDGET_S (default 200; 0: none).
ARM_JOBS=("${JOBS[@]}"); ARM_LOGS=("${LOGS[@]}")
JOBS=(); LOGS=()
for i in "${!ARM_JOBS[@]}"; do
  rc=$(cat "${ARM_LOGS[$i]}.rc" 2>/dev/null || echo killed)
  if [ "$rc" != 0 ]; then
    cp "${ARM_LOGS[$i]}" "${ARM_LOGS[$i]%.log}.died.log" 2>/dev/null || true
    JOBS+=("${ARM_JOBS[$i]}"); LOGS+=("${ARM_LOGS[$i]}")
  fi
done
if [ ${#JOBS[@]} -gt 0 ] && [ "${ARMS_RETRY_BUDGET_S:-200}" -gt 0 ]; then
  stamp "resuming ${#JOBS[@]} arm(s) that died or were cut (their first logs: *.died.log)"
  run_all "${ARMS_RETRY_BUDGET_S:-200}" "arms resumed"
fi

# 3. the RL start (the warm-up weights) and each arm's last checkpoint (a run folder stands for its newest),
#    one process per model x seed, all without hints
JOBS=(); LOGS=()
for S in $SEEDS; do
  [ -f "$RUN/seed$S/warmup/warmup.json" ] && eval_job "$S" initial "$RUN/seed$S/warmup/checkpoint"
  for A in $ARMS; do
    if ls "$RUN/seed$S/$A"/checkpoints/step_*/run_state.json > /dev/null 2>&1; then
      eval_job "$S" "$A" "$RUN/seed$S/$A"
    fi
  done
done
[ ${#JOBS[@]} -gt 0 ] && run_all "${EVAL_BUDGET_S:-140}" "evaluation"

# 4. results.json, the table and the curves
python3 bench/arms_summary.py "$RUN" "$OUT/results.json" --config smollm2_world --benchmark word_hard \
  --plan "$OUT/arms_plan.txt" --curves "$OUT/curves.png" --seeds "${SEEDS// /,}" "${COMMON[@]}" "world.output_dir=$DATA" \
  | tee "$OUT/table.md" || stamp "summary failed"
collect_outputs
stamp "results in $OUT"
