#!/usr/bin/env bash
# The README's first command on a fresh venv, without the dev extra, with the main job shortened by Hydra
# overrides: world data, a 30-step warm-up with two calibration checks, GRPO (the plain, questa and adaptive
# arms, 8 steps each, checkpoints every 4), a SIGTERM mid-run once the first arm has a checkpoint (exit 3 after
# a checkpoint), a rerun that resumes from it, and
# the final evaluation (summary.json). A runtime dependency missing from pyproject.toml fails it (psutil did:
# the warm-up's checkpoint writer died).
#   bash .ci/fresh_install_main_job.sh [VENV_DIR] [RUN_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$(mktemp -d)/venv}"
RUN="${2:-$(mktemp -d)/run}"
fail() { echo "fresh-install main job: FAIL: $*"; exit 1; }

# exactly the README's first command (python3 -m venv X && . X/bin/activate && pip install torch==2.13.0 &&
# pip install -e . && questa-nemo train), the train part shortened below
python3 -m venv "$VENV" && . "$VENV/bin/activate" || fail "venv"
pip install -q torch==2.13.0 || fail "pip install torch==2.13.0"
pip install -q -e . || fail "pip install -e ."

overrides=(
  train.run_dir="$RUN" train.progress_bar=false
  world.warmup_examples=512 world.rl_problems=64 world.eval_problems=32 world.calib_problems_per_length=8
  train.warmup.steps=30 train.warmup.check_every=15 train.warmup.stop_at_pass1=1.0
  train.steps=8 train.save_every=4 train.recovery_every=2 train.eval_every=4
  train.validation_problems=16 train.validation_samples=2 train.prompts_per_step=4 rollout.n_samples=4
  eval.n_samples=4 "eval.ks=[1,2,4]"
)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# 1st run: SIGTERM once the plain arm has its first checkpoint; the trainer checkpoints and exits 3 (requeue)
timeout 600 questa-nemo train "${overrides[@]}" > "$RUN.first.log" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
  [ -n "$(ls -d "$RUN"/plain/checkpoints/step_* 2>/dev/null)" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
kill -TERM "$pid" 2>/dev/null
wait "$pid"; rc=$?
tail -5 "$RUN.first.log"
[ "$rc" = 3 ] || fail "first run: exit $rc, expected 3 (preempted after a checkpoint); log: $RUN.first.log"
ls -d "$RUN"/warmup/checkpoint "$RUN"/plain/checkpoints/step_* >/dev/null || fail "no warm-up or GRPO checkpoint"

# 2nd run: the same command resumes the plain arm from its checkpoint, runs questa and adaptive, evaluates
timeout 600 questa-nemo train "${overrides[@]}" > "$RUN.second.log" 2>&1
rc=$?
tail -5 "$RUN.second.log"
[ "$rc" = 0 ] || fail "second run: exit $rc; log: $RUN.second.log"
grep -q "resumed $RUN/plain at step" "$RUN.second.log" || fail "second run did not resume the plain arm"
for f in summary.json plain/DONE questa/DONE adaptive/DONE; do [ -e "$RUN/$f" ] || fail "missing $RUN/$f"; done
echo "fresh-install main job: PASS ($RUN)"
