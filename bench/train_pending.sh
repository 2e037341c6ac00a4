#!/usr/bin/env bash
# The training rows written without a GPU, in priority order, as one detached run that may span several device
# calls (bench/device_wait.sh brings its folder back):
#   1. tests/test_linear.py (its no-DDP test fixed since its last GPU run), tests/test_fused.py
#   2. 32K, full recompute keeping attention, FA4, the log-prob head in one chunk (model.logprob_chunk_tokens
#      32768): its per-chunk kernels torch.compile'd (model/logprobs.py CUDA_KERNELS=compile, the default) against
#      Triton's (triton: one read of the logits forward, a gradient kernel with 64-bit offsets), each with and
#      without the fused QKV split + RoPE (model/fused.py FusedQKVSelfAttention, qkvrope=1; off by default),
#      interleaved, with transformers compiled (its strongest stock setting) between them; and with each layer's
#      SwiGLU output kept through recompute (model.recompute_keep_swiglu, keepswiglu=1: its forward not rerun)
#   3. 8K, one and eight micro-batches a step, every layer compiled on both sides: the same, transformers
#      compiled beside them; then the GRPO step shaped like NeMo-RL's table (FA4, sync; packed rows, so the
#      split path) on each log-prob kernel choice
# Done in an earlier run (bench/results/train_pending_h100/, docs/benchmarks.md (χ)): FA4's direct forward, CUDA
# graphs, the trainer's weight gradients into the main grad, the GRPO step with and without them.
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
timeout -k 10 300 python3 -m pytest -q -p no:cacheprovider tests/test_linear.py tests/test_fused.py; step tests $?
TRAIN="python3 bench/bench_train.py --device cuda --preset none --steps 8 --time-budget-s 5000"
LONG=32768/mcore:recompute=full,attn=fa4,keepattn=1,chunk=32768
HF32=32768/hf:recompute=full,compile=1,attn=fa4
$TRAIN --steps 4 --out "$R/train_32k_lpk.json" --runs $LONG,lpk=compile,qkvrope=0 $LONG,lpk=triton,qkvrope=0 $HF32 \
  $LONG,lpk=triton,qkvrope=1 $LONG,lpk=triton,qkvrope=1,keepswiglu=1 $LONG,lpk=compile,qkvrope=1 $HF32
step train_32k $?
HF=8192/hf:recompute=none,compile=1
OURS=8192/mcore:recompute=none,compile=1,attn=fa4
$TRAIN --out "$R/train_8k_lpk.json" --runs $HF $OURS,lpk=compile,qkvrope=0 $OURS,lpk=triton,qkvrope=0 \
  $OURS,lpk=triton,qkvrope=1 $OURS,lpk=compile,qkvrope=1 $HF
step train_8k $?
$TRAIN --out "$R/train_8k_accum8.json" --runs $HF,accum=8 $OURS,lpk=compile,accum=8,qkvrope=0 \
  $OURS,lpk=triton,accum=8,qkvrope=1
step train_8k_accum8 $?
GRPO="python3 bench/bench_grpo_nemorl.py --steps 2 --staleness 0 --proximal train_forward --recompute none
  --micro-batch-tokens 8192 --attention fa4"
$GRPO --logprob-kernels compile --out "$R/grpo_lpk_compile.json"; step grpo_lpk_compile $?
$GRPO --logprob-kernels triton --out "$R/grpo_lpk_triton.json"; step grpo_lpk_triton $?
touch "$R/done"
