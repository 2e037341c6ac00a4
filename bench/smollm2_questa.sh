#!/usr/bin/env bash
# Superseded for issue 20 by bench/smollm2_arms.sh (one warm-up per seed, the three equal-compute arms as
# concurrent processes). This runner trains every arm of conf/smollm2_world.yaml in one process, one after the
# other (STEPS each), which no longer fits one device call's budget.
# QuestA on SmolLM2-135M-Instruct, one GPU: join + check the GGUF -> import to an HF folder ->
#   word-world data -> supervised warm-up (stops by calibration) -> GRPO, hint arm (p50) and no_hint arm (p0),
#   same steps and seed -> final evaluation of initial / hint / no_hint without hints -> results in $OUT.
# Usage (repository root, GPU image):
#   bash bench/smollm2_questa.sh GGUF [PART1 PART2] [key=value ...]
# GGUF: where the re-joined file lives (or already lives); PART1 PART2: its halves from bench/split_gguf.sh,
# joined into GGUF first. The sha256 must match bench/smollm2_gguf.sha256. A `gguf-*.whl` beside GGUF or in
# .gguf/ is installed when `import gguf` fails. Overrides go to both the data command and the trainer.
# Budget (H200, estimated): import ~30 s, warm-up <= 600 steps (stops by calibration), per arm 50 steps x 32
# prompts x 8 samples (<= 256 new tokens), final evaluation of 3 models x (128 + 96) problems x 16 samples.
# More than one device call's 10 minutes: run it with DETACH=1 and wait with bench/device_wait.sh in the same
# and the next call. STEPS=... sets the GRPO steps per arm; TRAIN_BUDGET_S (default 480) bounds the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${1:?usage: bench/smollm2_questa.sh GGUF [PART1 PART2] [key=value ...]}
shift
PARTS=()
while [ $# -gt 0 ] && [[ "$1" != *=* ]]; do PARTS+=("$1"); shift; done
OVERRIDES=("$@")
OUT=${OUT:-outputs/smollm2_questa_out}
RUN=${RUN:-runs/smollm2_world}
STEPS=${STEPS:-50}
START=$(date +%s)
stamp() { echo "[smollm2_questa +$(( $(date +%s) - START ))s] $*"; }

NAME=smollm2_questa
. bench/smollm2_common.sh
smollm2_gguf_ready

# DETACH=1: go on in a new process session, from a copy of the repository outside the synced working tree,
# so the run outlives this device call (later calls keep the machine warm: bench/device_wait.sh waits on
# $OUT/done and brings $OUT back as one archive). Output goes to $OUT/run.log.
if [ -n "${DETACH:-}" ]; then
  smollm2_detach smollm2_questa.sh "${DETACH_REPO:-$HOME/questa_nemo_run}"
  exit 0
fi
trap 'touch "$OUT/done"' EXIT

smollm2_gpu_env
mkdir -p "$OUT"
python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' \
  | tee "$OUT/device.txt"

M=$RUN/hf
if [ ! -f "$M/config.json" ]; then
  python3 -m questa_nemo.cli import "$GGUF" "$M" format=hf
fi
stamp "imported: $M"
COMMON=(model.hf_config="$M" model.checkpoint="$M" train.run_dir="$RUN" train.steps="$STEPS"
        train.save_every="$STEPS" "${OVERRIDES[@]}")
if [ -n "${WORLD_DATA:-}" ]; then  # built beforehand where `datasets` is installed (the GPU image lacks it)
  mkdir -p "$RUN" && rm -rf "$RUN/data" && cp -r "$WORLD_DATA" "$RUN/data"
else
  python3 -m questa_nemo.data.word_world --config-name smollm2_world "${COMMON[@]}"
fi
stamp "word world written: $RUN/data"
set +e
# Bounded so that the results copied below always come back inside the device call's limit.
timeout --signal=TERM "${TRAIN_BUDGET_S:-480}" \
  python3 -m questa_nemo.cli train --config-name smollm2_world "${COMMON[@]}" train.progress_bar=false \
  2>&1 | tee "$OUT/train.log"
STATUS=${PIPESTATUS[0]}
set -e
stamp "train exited with $STATUS"

for f in summary.json curves.png config.yaml eval/passk.png warmup/warmup.json warmup/calibration.json; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
[ -d "$RUN/eval" ] && cp -r "$RUN/eval" "$OUT/eval"
for arm in plain questa adaptive; do
  mkdir -p "$OUT/$arm"
  for f in "$RUN/$arm"/*.jsonl "$RUN/$arm"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/$arm/"; done
done
cp "$RUN/data/rl/manifest.json" "$OUT/data_manifest.json" 2>/dev/null || true
stamp "results in $OUT"
exit "$STATUS"
