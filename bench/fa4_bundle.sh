#!/usr/bin/env bash
# FlashAttention 4 and what it imports, for the GPU image (Python 3.12, torch and Triton already there, nothing
# can be fetched there): one folder to put on PYTHONPATH, xz-compressed and split in two parts under 40 MiB, for
# two device calls on one warm machine (the checkout and what a call carries are limited to 64 MiB together).
# Run here (CPU machine with pip); then the first call carries .fa4a and copies it into .fa4stash/, the second
# carries .fa4b and .whl and starts with
#   mkdir -p .fa4site && cat .fa4stash/part_* .fa4b/part_* | tar xJ -C .fa4site && . bench/gpu_setup.sh &&
#   export PYTHONPATH=$PWD/.fa4site:$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# What the CuTe DSL needs besides its two wheels of compiled libraries (found by importing flash_attn.cute on a
# CPU: it imports without a GPU): nvidia-cutlass-dsl-libs-core (the DSL's Python, `cutlass.cute`) and tvm-ffi's
# libtvm_ffi_testing.so (tvm_ffi loads it at import). cuda-bindings, protobuf, einops and triton are in the image.
# Usage: bash bench/fa4_bundle.sh [CUDA_FLAVOUR (cu12|cu13, default cu13: the image's torch is built for CUDA 13)]
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR=${1:-cu13}
WORK=$(mktemp -d)
pip_get() {
  python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    -d "$WORK/wheels" "$@"
}
pip_get flash-attn-4==4.0.0b40 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 "nvidia-cutlass-dsl-libs-$FLAVOUR==4.8.1" "apache-tvm-ffi<0.2,>=0.1.11" \
  torch-c-dlpack-ext
mkdir -p "$WORK/site"
for w in "$WORK"/wheels/*.whl; do unzip -q -o "$w" -d "$WORK/site"; done
# not imported: other platforms' stubs, the profiler injection library, tvm-ffi's C++ sources
rm -rf "$WORK/site/nvidia_cutlass_dsl/$FLAVOUR/lib/stubs" "$WORK/site/nvidia_cutlass_dsl/dsl_packages/iket/profiler" \
  "$WORK/site/tvm_ffi/3rdparty" "$WORK/site/tvm_ffi/src"
du -sh "$WORK/site"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
tar cf - -C "$WORK/site" . | xz -T0 -9e | split -b 40M - "$WORK/part_"
mv "$WORK/part_aa" .fa4a/ && mv "$WORK"/part_a[b-z] .fa4b/
ls -la .fa4a .fa4b
rm -rf "$WORK"
