#!/usr/bin/env bash
# Issue 20's arms on the embedded default (`questa-nemo train`, conf/default.yaml + conf/train/world.yaml:
# plain / questa / adaptive from one warm-up, the same budget of generated tokens, evaluated without hints)
# over several seeds, and one JSON + table of them:
#
#   bash bench/embedded_arms.sh 1 2 3
#
# Seed S sets train.seed=S and model.seed=S (warm-up order, initial weights, sampling); the world stays the same.
# Each seed runs in its own process with THREADS intra-op threads (default 2: the README's 2-core setting; on
# a 2-core machine run the seeds one after the other with SERIAL=1) into $OUT/seed<S>, its log in
# $OUT/seed<S>.log. Then bench/arms_summary.py writes $SUMMARY (default bench/results/embedded_arms_seeds.json):
# per seed the warm-up's stop, no-hint pass@1 and pass@8 (standard errors over the 500 hard problems) of the RL
# start and of each arm, each arm's generated tokens and zero-signal share, stage minutes; over seeds the mean
# and standard error; the table goes to stdout and $OUT/table.md, the curves to $OUT/curves.png.
# Environment: OUT (runs/embedded_arms), THREADS (2), SERIAL, PYTHON (python), EXTRA (more overrides for every
# seed), SUMMARY_ONLY=1 (runs already there).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/embedded_arms.sh SEED [SEED ...]" >&2; exit 2; }
OUT=${OUT:-runs/embedded_arms}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-python}
SUMMARY=${SUMMARY:-bench/results/embedded_arms_seeds.json}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

one_seed() {
  local S=$1 start rc
  start=$(date +%s)
  mkdir -p "$OUT/seed$S"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PYTHON" -m questa_nemo.cli train \
    "train.run_dir=$OUT/seed$S" "train.seed=$S" "model.seed=$S" train.progress_bar=false ${EXTRA:-} \
    > "$OUT/seed$S.log" 2>&1
  rc=$?
  echo $(( $(date +%s) - start )) > "$OUT/seed$S/wall_s"
  echo "seed $S: exit $rc after $(cat "$OUT/seed$S/wall_s") s ($OUT/seed$S.log)"
}

if [ -z "${SUMMARY_ONLY:-}" ]; then
  pids=()
  for S in "$@"; do
    if [ -n "${SERIAL:-}" ]; then one_seed "$S"; else one_seed "$S" & pids+=($!); fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
fi
SEEDS=$(IFS=,; echo "$*")
# shellcheck disable=SC2086
"$PYTHON" bench/arms_summary.py "$OUT" "$SUMMARY" --config default --benchmark world_hard --ks 1,8 \
  --seeds "$SEEDS" --curves "$OUT/curves.png" ${EXTRA:-} | tee "$OUT/table.md"
