#!/usr/bin/env bash
# Build a separate CPU venv with NeMo 1.x's loader (nemo_toolkit 2.4.1, the last release with
# MegatronGPTModel) for bench/nemo_restore_check.py. Never install this into the project's venv:
# NeMo 2.4.1 needs megatron-core 0.13.1 and transformers 4.51.x.
#   bash bench/nemo_restore_venv.sh [VENV]   (default $HOME/.venvs/nemo-restore; ~2 GB, ~70 s with a cold cache)
set -euo pipefail
VENV=${1:-$HOME/.venvs/nemo-restore}
PY=${PYTHON:-python3.11}
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install --upgrade pip wheel
# torch 2.13.0 CPU (this machine: /opt/wheels holds the +cpu wheel and pip finds it there).
$PIP install torch==2.13.0
$PIP install --no-deps nemo_toolkit==2.4.1 megatron-core==0.13.1
# What the NLP collection imports at load (found one import error at a time; docs/export.md lists the CPU-only workarounds).
$PIP install "numpy<2" lightning==2.4.0 hydra-core==1.3.2 omegaconf==2.3.0 transformers==4.51.3 \
  sentencepiece cloudpickle fiddle wrapt ruamel.yaml einops torchmetrics wget "onnx<1.23" "protobuf==5.29.*" \
  "tensorboard<=2.20" numba scikit-learn pandas braceexpand webdataset psutil ijson matplotlib sacrebleu \
  rouge_score jieba opencc "pangu<4.1" safetensors pyyaml tqdm huggingface_hub tokenizers packaging \
  datasets inflect text-unidecode editdistance nltk sentencepiece tiktoken
echo "venv ready: $VENV"
