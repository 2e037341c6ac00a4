# Source on the GPU machine (Python 3.12 image without our extra packages): installs the wheels carried in
# .whl/ (megatron-core for Python 3.12, omegaconf, hydra-core, antlr4, math-verify) into /tmp/site.
# How the wheels were fetched: see README "Benchmarks". Usage: `. bench/gpu_setup.sh`
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
