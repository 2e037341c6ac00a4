# Source on the GPU machine (Python 3.12 image without our extra packages): installs the wheels carried in
# .whl/ (megatron-core for Python 3.12, omegaconf, hydra-core, antlr4, math-verify) into /tmp/site.
# The wheels (.whl/ is git-ignored; pass each as the device call's carry), fetched on a CPU machine:
#   pip download --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: -d .whl \
#     megatron-core==0.19.2 omegaconf==2.3.1 hydra-core==1.3.8 math-verify==0.9.0 latex2sympy2_extended==1.11.0
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # an sdist only: built here, pure Python
# Usage: `. bench/gpu_setup.sh`
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
