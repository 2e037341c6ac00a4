#!/usr/bin/env bash
# Which megatron-core versions questa-nemo runs on: for each version, a venv with it installed (pip resolves its
# own requirements, e.g. numpy<2 before 0.16), then bench/mcore_version_check.py builds the tiny world model,
# trains 3 steps, saves, loads and resumes. One PASS/FAIL line per version, and a JSON of all of them.
#
#   bash bench/megatron_versions.sh [VERSION ...]          default: every minor release 0.13..0.19 (latest patch)
#   OUT=bench/results/megatron_versions.json               where the JSON goes
#   PY311=python3.11 PY312=python3.12                      interpreters (0.17+ requires Python >= 3.12)
#   TORCH_SPEC="torch==2.13.0"                             what torch to install ("" = keep the interpreter's,
#   SYSTEM_SITE=1                                            with SYSTEM_SITE=1: e.g. a GPU image's CUDA torch)
#   VENVS=/tmp/megatron_versions                           venvs live here, one per Python; each version is
#                                                            installed in turn into its Python's venv (pip
#                                                            replaces the previous megatron-core and adjusts
#                                                            numpy); FRESH=1 makes a new venv for every version
#   VENV311=... VENV312=...                                an existing or cached venv for that Python instead
#                                                            (.ci/run keeps its 3.12 venv, ~5 GB, in ~/.cache)
#
# On a CPU machine Python 3.12 gets torch 2.13.0 from PyPI, the CUDA build (~3 GB with its nvidia-* wheels; it
# runs on CPU); 3.11 gets the CPU wheel. Exit status 0 when every version asked for passed, 1 otherwise.
set -uo pipefail
ROOT="${ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
OUT="${OUT:-$ROOT/bench/results/megatron_versions.json}"
VENVS="${VENVS:-/tmp/megatron_versions}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
SYSTEM_SITE="${SYSTEM_SITE:-0}"
FRESH="${FRESH:-0}"

find_python() {  # $1 = 3.11 / 3.12
  local v="$1" var="PY${1/./}"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  for c in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python /usr/bin/python"$v"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "'"$v"'".split("."))))' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  local p; p="$(command -v python3)"
  if "$p" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "'"$v"'".split("."))))'; then echo "$p"; fi
}

# the runtime dependencies of pyproject.toml, less megatron-core (each version is installed explicitly)
runtime_deps() {
  "$1" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace("_", "-").startswith(("megatron-core", "torch"))))
PY
}

versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(0.13.1 0.14.0 0.15.3 0.16.1 0.17.1 0.18.2 0.19.0 0.19.2)
mkdir -p "$VENVS" "$(dirname "$OUT")"
results=()
status=0
for v in "${versions[@]}"; do
  minor="${v#0.}"; minor="${minor%%.*}"
  pyver=3.11; [ "$minor" -ge 17 ] && pyver=3.12
  py="$(find_python $pyver)"
  json="$VENVS/result-$v.json"
  rm -f "$json"
  if [ -z "$py" ]; then
    line="FAIL megatron-core $v: no Python $pyver found (set PY${pyver/./})"
    echo "{\"version\": \"$v\", \"python\": null, \"status\": \"FAIL\", \"stage\": \"python\", \"error\": \"no Python $pyver\"}" > "$json"
  else
    venv_var="VENV${pyver/./}"
    venv="${!venv_var:-$VENVS/py$pyver}"; [ "$FRESH" = 1 ] && venv="$VENVS/mcore-$v"
    log="$VENVS/install-$v.log"
    if [ ! -x "$venv/bin/python" ] || [ "$FRESH" = 1 ]; then
      rm -rf "$venv"
      flags=(); [ "$SYSTEM_SITE" = 1 ] && flags=(--system-site-packages)
      "$py" -m venv "${flags[@]}" "$venv" > "$log" 2>&1
      "$venv/bin/pip" install -q --upgrade pip >> "$log" 2>&1
      if [ -n "$TORCH_SPEC" ]; then "$venv/bin/pip" install -q "$TORCH_SPEC" >> "$log" 2>&1; fi
    fi
    # always, also in a reused venv (a no-op when satisfied): what pyproject.toml asks for today
    # shellcheck disable=SC2046
    "$venv/bin/pip" install -q $(runtime_deps "$venv/bin/python") >> "$log" 2>&1
    if ! "$venv/bin/pip" install -q "megatron-core==$v" >> "$log" 2>&1; then
      line="FAIL megatron-core $v (Python $pyver): does not install (see $log)"
      echo "{\"version\": \"$v\", \"python\": \"$pyver\", \"status\": \"FAIL\", \"stage\": \"install\", \"error\": \"pip install failed\"}" > "$json"
    else
      line="$(cd "$VENVS" && PYTHONPATH="$ROOT" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" timeout 900 \
        "$venv/bin/python" "$ROOT/bench/mcore_version_check.py" --json "$json" 2> "$VENVS/run-$v.log" | tail -1)"
      [ -z "$line" ] && line="FAIL megatron-core $v (Python $pyver): the check died (see $VENVS/run-$v.log)"
      [ -f "$json" ] || echo "{\"version\": \"$v\", \"python\": \"$pyver\", \"status\": \"FAIL\", \"stage\": \"crash\", \"error\": \"see run log\"}" > "$json"
    fi
  fi
  echo "$line"
  case "$line" in PASS*) ;; *) status=1 ;; esac
  results+=("$json")
done
python3 - "$OUT" "${results[@]}" <<'PY'
import json, sys
out, files = sys.argv[1], sys.argv[2:]
json.dump([json.load(open(f)) for f in files], open(out, "w"), indent=2)
open(out, "a").write("\n")
PY
echo "wrote $OUT"
exit $status
