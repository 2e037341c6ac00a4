#!/usr/bin/env bash
# The multi-GPU suite in one command, on any machine with 1, 2, 4 or 8 GPUs (bench/multi_gpu.py says what runs
# at each count): NCCL parity of TP / PP / DP train steps and rollouts against one rank, 3 GRPO steps of the
# tiny world model at TP=2, PP=2, DP=2 (TP=2 x DP=2 on 4+ GPUs), a TP=2 checkpoint loaded at TP=1. One JSON:
# $OUT/multi_gpu.json when OUT is set, else bench/results/multi_gpu.json. Exit 0 when every judged case passed.
#   bash bench/multi_gpu.sh                      # all visible GPUs
#   CUDA_VISIBLE_DEVICES=0 bash bench/multi_gpu.sh   # the single-GPU part only
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# NVLink SHARP (multicast) off: the lent machines do not support it (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron's TP overlap wants one hardware queue
exec "${PYTHON:-python3}" bench/multi_gpu.py "$@"
