#!/usr/bin/env bash
# NeMo 1.x's own loader (MegatronGPTModel.restore_from, nemo_toolkit 2.4.1) on .nemo files written by
# `questa-nemo export`, on CPU: our tiny world model and a tiny Qwen2, fp32 and bf16 (and Qwen2 at TP=2 on
# 2 gloo ranks); logits against
# transformers' on the source HF folder, tokenizer ids against the HF tokenizer. Run by hand (~5 min on 2 cores
# once the venv exists; building it takes ~2 min and 2 GB):
#   bash bench/nemo_restore_check.sh [WORK_DIR]
# PROJECT_PY: the project's python (default .venv/bin/python); NEMO_VENV: the NeMo venv (built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/nemo-restore-XXXX)}
PROJECT_PY=${PROJECT_PY:-.venv/bin/python}
NEMO_VENV=${NEMO_VENV:-$HOME/.venvs/nemo-restore}
[ -x "$NEMO_VENV/bin/python" ] || bash bench/nemo_restore_venv.sh "$NEMO_VENV"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PROJECT_PY" bench/nemo_restore_models.py "$WORK"
status=0
for model in world qwen2; do
  for dtype in fp32 bf16; do
    "$PROJECT_PY" -m questa_nemo.cli export "$WORK/$model" "$WORK/$model-$dtype.nemo" format=nemo dtype=$dtype \
      overwrite=true
    # The NeMo venv must not see our package or our venv's site-packages.
    if env -u PYTHONPATH "$NEMO_VENV/bin/python" bench/nemo_restore_check.py "$WORK/$model-$dtype.nemo" \
        "$WORK/$model" >"$WORK/$model-$dtype.log" 2>&1; then
      tail -n 1 "$WORK/$model-$dtype.log"
    else
      echo "FAIL $model-$dtype: see $WORK/$model-$dtype.log"; tail -n 3 "$WORK/$model-$dtype.log"; status=1
    fi
  done
done
# A TP=2 archive, restored by NeMo on 2 gloo ranks.
"$PROJECT_PY" -m questa_nemo.cli export "$WORK/qwen2" "$WORK/qwen2-tp2.nemo" format=nemo dtype=fp32 \
  model.tensor_parallel=2 overwrite=true
if env -u PYTHONPATH "$NEMO_VENV/bin/torchrun" --nproc-per-node=2 bench/nemo_restore_check.py \
    "$WORK/qwen2-tp2.nemo" "$WORK/qwen2" --tp 2 >"$WORK/qwen2-tp2.log" 2>&1; then
  grep '^{' "$WORK/qwen2-tp2.log"
else
  echo "FAIL qwen2-tp2: see $WORK/qwen2-tp2.log"; tail -n 3 "$WORK/qwen2-tp2.log"; status=1
fi
exit $status
