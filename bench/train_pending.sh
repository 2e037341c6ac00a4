#!/usr/bin/env bash
# The training rows written without a GPU, in priority order, as one detached run that may span several device
# calls (bench/device_wait.sh brings its folder back):
#   1. fa4_direct_check: model/flash4.py's direct forward (FAST_FORWARD, off until this passes) against FA4's own
#      forward, bit for bit, and the host time a call takes; then tests/test_linear.py, whose CUDA test checks the
#      default weight-gradient path (model/linear.py: the fp32-from-bf16 GEMM into main_grad against DDP's add)
#   2. 8K, one micro-batch a step: transformers compiled against ours FA4 with and without the direct forward,
#      interleaved (two of each) so the spread shows
#   3. 32K, full recompute keeping attention, FA4: direct forward, direct + every layer compiled, transformers
#      compiled (its strongest stock setting), then ours as before, and with the log-prob head in one or two
#      chunks (model.logprob_chunk_tokens 32768 / 16384: no / one chunk's logits recomputed in backward, each
#      ~3.8 TFLOP, for 7.5 / 5 GB more peak memory); each profiled
#   4. the trainer's own gradient path and update (optim=megatron: megatron DDP's fp32 main grads, megatron's
#      Adam), eager, four micro-batches a step: weight gradients added into the main grad by the GEMM (the
#      default) against autograd's bf16 gradient then DDP's add; then the GRPO step shaped like NeMo-RL's table
#      (FA4, sync) without and with it
#   5. part 2's rows at eight micro-batches a step (the GRPO step's shape); every compiled layer in CUDA graphs
#      (cgraph=1: torch.compile's mode="reduce-overhead"), both sides, one and eight micro-batches a step;
#      profiles of the direct forward at one and four micro-batches (where the GPU still waits)
# The order is what a short device lease should get first: the checks of defaults, then the goal rows.
# Needs the FA4 bundle (bench/fa4_bundle.sh) unpacked in .fa4site and the wheels of bench/gpu_setup.sh. Two calls
# on one warm machine (the bundle does not fit one call's 64 MiB):
#   carry [".fa4a"]:          mkdir -p .fa4stash && cp .fa4a/part_aa .fa4stash/
#   carry [".fa4b", ".whl"]:  mkdir -p .fa4site && cat .fa4stash/part_* .fa4b/part_* | tar xJ -C .fa4site &&
#                             . bench/gpu_setup.sh && (setsid bash bench/train_pending.sh &) ;
#                             sleep 5; bash bench/device_wait.sh /tmp/train_pending 560
#   later calls:              bash bench/device_wait.sh /tmp/train_pending 560
# Usage: bash bench/train_pending.sh [RUN_DIR]   (default /tmp/train_pending; writes RUN_DIR/run.log, one JSON per
# part, RUN_DIR/done at the end)
set -uo pipefail
cd "$(dirname "$0")/.."
R=${1:-/tmp/train_pending}
mkdir -p "$R"
exec > "$R/run.log" 2>&1
export PYTHONPATH=$PWD/.fa4site:$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
step() { echo "[train_pending] $1: rc=$2 at $(date +%T)"; }
timeout -k 10 300 python3 bench/fa4_direct_check.py --out "$R/fa4_direct.json"; step fa4_direct_check $?
timeout -k 10 300 python3 -m pytest -q -p no:cacheprovider tests/test_linear.py; step test_linear $?
TRAIN="python3 bench/bench_train.py --device cuda --preset none --steps 8 --time-budget-s 5000"
HF=8192/hf:recompute=none,compile=1
OURS=8192/mcore:recompute=none,compile=1,attn=fa4
$TRAIN --out "$R/train_fa4direct.json" --runs $HF $OURS $OURS,fa4direct=1 $OURS,fa4direct=1 $OURS $HF
step train_8k $?
LONG=32768/mcore:recompute=full,attn=fa4,keepattn=1
$TRAIN --steps 4 --out "$R/train_32k_fa4direct.json" --profile "$R/profile32k" --runs $LONG,fa4direct=1 $LONG,fa4direct=1,compile=1 \
  32768/hf:recompute=full,compile=1,attn=fa4 $LONG $LONG,chunk=32768 $LONG,chunk=16384
step train_32k $?
TRAINER=8192/mcore:recompute=none,attn=fa4,optim=megatron,accum=4
$TRAIN --out "$R/train_wgrad.json" --runs $TRAINER,wgrad=0 $TRAINER,wgrad=1 $TRAINER,wgrad=1 $TRAINER,wgrad=0
step train_wgrad $?
GRPO="python3 bench/bench_grpo_nemorl.py --steps 2 --staleness 0 --proximal train_forward --recompute none
  --micro-batch-tokens 8192 --attention fa4"
$GRPO --no-wgrad-into-main-grad --out "$R/grpo_wgrad0.json"; step grpo_wgrad0 $?
$GRPO --out "$R/grpo_wgrad1.json"; step grpo_wgrad1 $?
$TRAIN --out "$R/train_fa4direct_accum8.json" --runs $HF,accum=8 $OURS,accum=8 $OURS,fa4direct=1,accum=8
step train_8k_accum8 $?
$TRAIN --out "$R/train_cgraph.json" --runs $HF,cgraph=1 $OURS,cgraph=1 $OURS,cgraph=1,accum=8 $HF,cgraph=1,accum=8
step train_cgraph $?
$TRAIN --steps 4 --out "$R/train_fa4direct_profile.json" --profile "$R/profile" --runs $OURS,fa4direct=1 \
  $OURS,fa4direct=1,accum=4
step profile $?
touch "$R/done"
