# Sourced by bench/smollm2_arms.sh: the SmolLM2 GGUF joined from its halves and
# checked, the detached re-launch, and the GPU image's packages. Expects NAME (the runner's name for messages),
# OUT, GGUF, PARTS (array), OVERRIDES (array) and `stamp`; `set -euo pipefail` is the caller's.

smollm2_gguf_ready() {  # join PARTS into GGUF (when given) and check it against bench/smollm2_gguf.sha256
  if [ ${#PARTS[@]} -gt 0 ]; then
    mkdir -p "$(dirname "$GGUF")"
    cat "${PARTS[@]}" > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
  fi
  local expected actual
  expected=$(cut -d' ' -f1 bench/smollm2_gguf.sha256)
  actual=$(sha256sum "$GGUF" | cut -d' ' -f1)
  if [ "$actual" != "$expected" ]; then
    echo "$NAME: $GGUF has sha256 $actual, expected $expected (bench/smollm2_gguf.sha256)" >&2
    exit 1
  fi
  stamp "GGUF ok: $GGUF"
}

# DETACH=1: go on in a new process session, from a copy of the repository outside the synced working tree, so
# the run outlives this device call (later calls keep the machine warm: bench/device_wait.sh waits on
# $OUT/done and brings $OUT back as one archive). Output goes to $OUT/run.log; the caller exits after this.
smollm2_detach() {  # smollm2_detach SCRIPT COPY_DIR
  local script=$1 copy=$2 w
  rm -rf "$copy" && mkdir -p "$copy" "$OUT"
  tar --exclude=./.gguf --exclude=./.git --exclude=./runs --exclude=./outputs -cf - . | tar -xf - -C "$copy"
  [ -n "${WORLD_DATA:-}" ] && mkdir -p "$copy/.world" && cp -r "$WORLD_DATA"/. "$copy/.world/"
  for w in "$(dirname "$GGUF")"/gguf-*.whl .gguf/gguf-*.whl; do
    [ -f "$w" ] && mkdir -p "$copy/.gguf" && cp "$w" "$copy/.gguf/"
  done
  WORLD_DATA=${WORLD_DATA:+$copy/.world} DETACH= OUT="$OUT" setsid nohup bash "$copy/bench/$script" \
    "$GGUF" "${OVERRIDES[@]}" > "$OUT/run.log" 2>&1 < /dev/null &
  stamp "detached (pid $!): log $OUT/run.log, $OUT/done at the end"
}

smollm2_gpu_env() {  # megatron-core etc. from the carried wheels, and `gguf` where it is missing
  if ! python3 -c "import megatron.core, hydra" 2>/dev/null; then . bench/gpu_setup.sh; fi  # the GPU image
  if ! python3 -c 'import gguf' 2>/dev/null; then
    local wheel
    wheel=$(ls "$(dirname "$GGUF")"/gguf-*.whl .gguf/gguf-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$wheel" ] || { echo "$NAME: no gguf package and no gguf-*.whl to install" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheel"
    export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
  fi
}
