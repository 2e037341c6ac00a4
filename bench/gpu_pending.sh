#!/usr/bin/env bash
# The measurements written without a GPU, in priority order, inside one device call (parts 11 and 12 first: the
# newest):
#   -1. the fixed (256 x 1K + 2K) and realistic (256 slots) rollout rows with fused_norms (on by default since
#      part 0 ran) against without (engines paged_nofn, paged), and the recipe-length row with the defaults
#   0. the decode step's residual adds, RMSNorms and SwiGLU as Triton kernels (EngineOptions.fused_norms, on
#      since this ran) and its projections at <= 32 rows in Triton's skinny matmul (skinny_gemm, off):
#      profile_decode at 8 sequences of 8K, variants new, fn and sk; bench_skinny (cuBLAS against the skinny
#      kernel per projection at 1-32 rows, a tile sweep at 8); then bench_rollout's self-check (with the fused
#      kernel's bits against torch's add and the trainer's RMSNorm: `add_rmsnorm`) and its realistic row at
#      512 slots, engines paged, paged_fn and paged_fnsk
#   1. the tile merge of the split-K decode attention (EngineOptions.merge_tile, the default since it ran) at
#      a rollout's tail: profile_decode at 8 sequences of 8K, variants new and loop (the loop merge) side by
#      side (the step, its kernels, and the attention sweep timing both merges and their difference)
#   2. the same end to end: bench_rollout's realistic row, engines paged and paged_loop
#   3. packed training rows: torch's flash variable-length kernel against the SDPA paths, with a float32
#      check of both (bench_train --preset packed; measured once on an H100: model.packed_attention defaults to auto since)
#   4. the fused sampler's self-check against the float64 inverse CDF (bench_rollout.fused_sampler_check)
#   5. the end-to-end GRPO step shaped like NeMo-RL's table, sync, SDPA then varlen, the second profiled
#   6. the decode step at a rollout's tail (profile_decode at 8 sequences: the realistic row's floor)
#   7. 32K with full recompute, attention kept (bench_train --preset long: model.recompute_keep_attention)
#   8. the GRPO step one step off-policy, the producer decoding on its own CUDA stream (its tail overlaps
#      training)
#   9. training at 8K against compiled transformers with the value made contiguous (bench_train --preset
#      layout, profiled: where the 7% of attention time goes; ran 2026-12-06: no gain)
#  10. training at 8K with q / k / v head-major for SDPA (bench_train --preset headmajor, profiled), and the
#      32K rows with every layer compiled on both sides (--preset long_compile; ran 2026-12-06, docs/benchmarks.md (λ))
#  11. the realistic row against transformers generate, plain and with its static cache (compiled: --hf-static),
#      on the same 32 sequences up to 8K (rollout_realistic_hf, not run: plain alone would need over 540 s) or
#      4K (rollout_realistic_hf4k: plain took 265 s on an H100); the static one alone (--hf-skip-plain) up to
#      4K (rollout_realistic_hf4k_static) and 8K (rollout_realistic_hf_static); the 512-sequence row at 512
#      slots (rollout_realistic512); 2,048 sequences at 512 slots, the recipe's 128 prompts x 16 samples a step
#      (rollout_rlscale), and the same with int8 projections (rollout_rlscale_w8). All but rollout_realistic_hf
#      and rollout_realistic512 (its row ran as rollout_w8's engine paged) ran on an H100 (docs/benchmarks.md (π))
#  12. int8 and float8 projections at a rollout's tail (EngineOptions.weights8) and the step's Triton kernels as
#      programmatic dependent launches (EngineOptions.pdl): bench_skinny's int8, fp8 and pdl columns beside
#      cuBLAS and the bf16 skinny kernel (w8_skinny), the decode step at 8 sequences of 8K, variants new, sk,
#      pd, skpd, i8, i8pd and f8pd (decode_w8: on an H200, docs/benchmarks.md (ο), and an H100, (σ)), and the realistic row at 512
#      slots, engines paged, paged_skpd, paged_i8pd and paged_fp8pd, with the log-probs the 8-bit engines
#      sample against the bf16 forward first (rollout_w8). w8_skinny and rollout_w8 ran on an H100 (docs/benchmarks.md (π))
#  13. what a 32K step under activation recompute carries into the next one, by where it is freed, with and without
#      model/recompute.py's drop of megatron's mlp_norm_manager (ckpt_leftovers), and the 32K rows with torch's
#      checkpoint beside megatron's and transformers', with what one forward saves (train_long_ckpt); both ran on an
#      H100 (docs/benchmarks.md (σ))
# Each part has its own time bound (the next starts whatever happened); all output goes into
# $OUT/pending.tar.gz (a device call brings back few files); each part's last lines are printed as it ends.
# Usage (GPU image, repository root): . bench/gpu_setup.sh && OUT=$OUT bash bench/gpu_pending.sh [SECONDS [PART...]]
# SECONDS (default 570) bounds the whole; parts that would start past it are skipped. PARTS (default all, in
# this order: ckpt_leftovers train_long_ckpt rollout_realistic_hf rollout_realistic_hf4k rollout_rlscale rollout_realistic_hf4k_static rollout_realistic_hf_static rollout_rlscale_w8 w8_skinny decode_w8 rollout_w8 rollout_realistic512, then
# rollout_fixed_norms rollout_recipe decode_norms skinny rollout_norms decode_merge rollout_merge train_packed
# sampler_check grpo_sdpa grpo_varlen decode_tail train_long grpo_async train_layout train_headmajor
# train_long_compile) picks some.
# Where each part ran (the marks are notes in docs/benchmarks.md): parts -1 and 0-10 on an H100 (3-6 in one
# call, (∇); 1, 2 and 7 in one call, 8 in the next, (μ); 0 in one call, (κ); -1 and 9 in one call, 10 in the
# next, (λ)); parts 11 and 12 in five calls, (π), but for rollout_realistic_hf (not run) and decode_w8 (on an
# H200, (ο), and an H100, (σ)); part 13 in two calls, (σ).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder of the device call}
END=$(( $(date +%s) + ${1:-570} ))
shift || true
WANT=" ${*:-ckpt_leftovers train_long_ckpt rollout_realistic_hf rollout_realistic_hf4k rollout_rlscale rollout_realistic_hf4k_static rollout_realistic_hf_static rollout_rlscale_w8 w8_skinny decode_w8 rollout_w8 rollout_realistic512 rollout_fixed_norms rollout_recipe decode_norms skinny rollout_norms decode_merge rollout_merge train_packed sampler_check grpo_sdpa grpo_varlen decode_tail train_long grpo_async train_layout train_headmajor train_long_compile} "
DIR=$(mktemp -d)
LOG=$DIR/pending.log
: > "$LOG"

part() {  # part NAME SECONDS COMMAND...: run with a bound of min(SECONDS, time left - 15)
    local name=$1 want=$2
    shift 2
    case "$WANT" in *" $name "*) ;; *) return ;; esac
    local left=$(( END - $(date +%s) - 15 ))
    if [ "$left" -lt 30 ]; then
        echo "[gpu_pending] $name: skipped (${left}s left)" | tee -a "$LOG"
        return
    fi
    local bound=$(( want < left ? want : left ))
    echo "[gpu_pending] $name: up to ${bound}s" | tee -a "$LOG"
    timeout -k 10 "$bound" "$@" > "$DIR/$name.log" 2>&1
    echo "[gpu_pending] $name: rc=$?" | tee -a "$LOG"
    grep -v -E 'DEPRECATED|^\s*$' "$DIR/$name.log" | tail -n 12 | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
REAL=(--engines paged --hf-new-tokens 0 --new-tokens 0 --recipe-prompts 0)
part ckpt_leftovers 150 python3 bench/ckpt_leftovers.py --out "$DIR/ckpt_leftovers.json"
part train_long_ckpt 240 python3 bench/bench_train.py --device cuda --preset long_ckpt --steps 3 --saved-sites \
    --time-budget-s 200 --out "$DIR/train_long_ckpt.json"
part rollout_realistic_hf 540 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 2 --hf-realistic --hf-static \
    --out "$DIR/rollout_realistic_hf.json"
part rollout_realistic_hf4k 300 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 2 --realistic-max 4096 \
    --hf-realistic --hf-static --out "$DIR/rollout_realistic_hf4k.json"
part rollout_rlscale 240 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 128 --batch 512 \
    --out "$DIR/rollout_rlscale.json"
part rollout_realistic_hf4k_static 300 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 2 \
    --realistic-max 4096 --hf-realistic --hf-static --hf-skip-plain --out "$DIR/rollout_realistic_hf4k_static.json"
part rollout_realistic_hf_static 480 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 2 --hf-realistic \
    --hf-static --hf-skip-plain --out "$DIR/rollout_realistic_hf_static.json"
part rollout_rlscale_w8 330 python3 bench/bench_rollout.py --engines paged,paged_i8pd --hf-new-tokens 0 --new-tokens 0 \
    --recipe-prompts 0 --realistic-prompts 128 --batch 512 --out "$DIR/rollout_rlscale_w8.json"
part w8_skinny 100 python3 bench/bench_skinny.py --no-sweep --out "$DIR/w8_skinny.json"
part decode_w8 210 python3 bench/profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed \
    --variants new,sk,pd,skpd,i8,i8pd,f8pd --quick-sweep --sweep-block-sizes 64 --attn-reps 3 \
    --out "$DIR/decode_w8.json"
part rollout_w8 300 python3 bench/bench_rollout.py --engines paged,paged_skpd,paged_i8pd,paged_fp8pd --hf-new-tokens 0 \
    --new-tokens 0 --recipe-prompts 0 --realistic-prompts 32 --batch 512 --out "$DIR/rollout_w8.json"
part rollout_realistic512 120 python3 bench/bench_rollout.py "${REAL[@]}" --realistic-prompts 32 --batch 512 \
    --out "$DIR/rollout_realistic512.json"
part rollout_fixed_norms 200 python3 bench/bench_rollout.py --engines paged_nofn,paged --hf-new-tokens 0 \
    --recipe-prompts 0 --out "$DIR/rollout_fixed_norms.json"
part rollout_recipe 130 python3 bench/bench_rollout.py --engines paged --hf-new-tokens 0 --new-tokens 0 \
    --realistic-prompts 0 --out "$DIR/rollout_recipe.json"
part decode_norms 90 python3 bench/profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed \
    --variants new,fn,sk --quick-sweep --sweep-block-sizes 64 --attn-reps 3 --out "$DIR/decode_norms.json"
part skinny 120 python3 bench/bench_skinny.py --sweep-seconds 12 --out "$DIR/skinny.json"
part rollout_norms 330 python3 bench/bench_rollout.py --also-check --engines paged,paged_fn,paged_fnsk --hf-new-tokens 0 \
    --new-tokens 0 --recipe-prompts 0 --batch 512 --out "$DIR/rollout_norms.json"
part decode_merge 120 python3 bench/profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed \
    --variants new,loop --quick-sweep --sweep-block-sizes 64 --out "$DIR/decode_merge.json"
part rollout_merge 240 python3 bench/bench_rollout.py --engines paged,paged_loop --hf-new-tokens 0 \
    --new-tokens 0 --recipe-prompts 0 --out "$DIR/rollout_merge.json"
part train_packed 170 python3 bench/bench_train.py --device cuda --preset packed --steps 6 --time-budget-s 140 \
    --out "$DIR/train_packed.json"
part sampler_check 45 python3 -c "
import json, sys
sys.path.insert(0, 'bench')
import bench_rollout
print(json.dumps(bench_rollout.fused_sampler_check(151936), indent=1))"
GRPO=(--steps 2 --staleness 0 --proximal train_forward --recompute none --micro-batch-tokens 8192)
part grpo_sdpa 150 python3 bench/bench_grpo_nemorl.py "${GRPO[@]}" --packed-attention sdpa --out "$DIR/grpo_sdpa.json"
part grpo_varlen 170 python3 bench/bench_grpo_nemorl.py "${GRPO[@]}" --packed-attention varlen --profile "$DIR/profile_grpo" \
    --out "$DIR/grpo_varlen.json"
part decode_tail 90 python3 bench/profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed \
    --variants new,ts --quick-sweep --out "$DIR/decode_tail.json"
part train_long 200 python3 bench/bench_train.py --device cuda --preset long --steps 3 --time-budget-s 170 \
    --out "$DIR/train_long.json"
part grpo_async 210 python3 bench/bench_grpo_nemorl.py --steps 3 --staleness 1 --skip-sync --producer-stream \
    --proximal train_forward --recompute none --micro-batch-tokens 8192 --out "$DIR/grpo_async.json"
part train_layout 200 python3 bench/bench_train.py --device cuda --preset layout --steps 4 --time-budget-s 170 \
    --profile "$DIR/profile_layout" --out "$DIR/train_layout.json"
part train_headmajor 120 python3 bench/bench_train.py --device cuda --preset headmajor --steps 4 --time-budget-s 100 \
    --profile "$DIR/profile_headmajor" --out "$DIR/train_headmajor.json"
part train_long_compile 400 python3 bench/bench_train.py --device cuda --preset long_compile --steps 3 \
    --time-budget-s 370 --out "$DIR/train_long_compile.json"
tar -czf "$OUT/pending.tar.gz" -C "$DIR" .
