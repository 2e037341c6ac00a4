# questa-nemo on NVIDIA's NeMo container. The container's torch, megatron-core, Transformer Engine, TensorRT-LLM
# and transformers stay exactly as NVIDIA built them: they are passed to pip as constraints, so pip adds only
# what is missing (math-verify, hydra-core, ...) and fails loudly instead of replacing a preinstalled package.
# tests/test_install_env.py checks that our pins admit such an environment.
#   docker build -t questa-nemo:latest .          (or: enroot import dockerd://questa-nemo:latest)
#   python slurm/submit.py --image <the .sqsh or registry path> ...
# The default image, NeMo 25.09, ships megatron-core 0.14.0rc3: the lowest version of the tested range
# (pyproject.toml's pin, docs/install.md's table, checked on every CI run). An image whose megatron-core is outside
# the pin fails this build at the pip step (its version is a constraint), never at the first training step.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:25.09
FROM ${NEMO_IMAGE}

# Caches live on a mounted volume (slurm/submit.py --mounts .../cache:/cache), not in the image.
ENV HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

# slurm/common.sh runs /opt/questa-nemo/slurm/launch.py inside the container.
WORKDIR /opt/questa-nemo
COPY pyproject.toml README.md ./
COPY questa_nemo ./questa_nemo
COPY conf ./conf
COPY data/world ./data/world
COPY slurm ./slurm

RUN pip list --format=freeze \
        | grep -iE '^(torch|megatron[-_]core|transformer[-_]engine|tensorrt[-_]llm|transformers|apex|flash[-_]attn)==' \
        > /tmp/preinstalled.txt \
    && pip install --no-cache-dir -c /tmp/preinstalled.txt . \
    && rm /tmp/preinstalled.txt \
    && questa-nemo doctor

WORKDIR /workspace
