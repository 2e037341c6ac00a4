#!/usr/bin/env bash
# Run by .ci/run (also by hand): bash .ci/install_checks.sh [SCRATCH_DIR]. Exit 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
scratch="${1:-$(mktemp -d)}"
rc=0

# The README's first command in a fresh venv WITHOUT the dev extra, the main job shortened by overrides: warm-up,
# GRPO, SIGTERM + resume, evaluation (~3 min). A runtime dependency missing from pyproject.toml fails here.
timeout 15m bash .ci/fresh_install_main_job.sh "$scratch/fresh" "$scratch/run" || { echo "CI: fresh-install main job failed"; rc=1; }

# megatron-core, the ends of the tested range (pyproject.toml's pin; docs/install.md's table): the lowest in its
# Python 3.11 venv (the fresh one above, megatron-core swapped), the highest in a Python 3.12 venv (0.17+ need
# 3.12; pyenv's or python3.12; torch 2.13.0 from PyPI, the CUDA build, runs on CPU). Build, train, save, load.
# The 3.12 venv (torch's CUDA wheels, ~5 GB; installing it took 24 min on a busy machine) is kept between runs in
# ~/.cache; its runtime dependencies are re-installed from pyproject.toml each time (a no-op when satisfied).
mkdir -p "$scratch/mcore"
VENVS="$scratch/mcore" VENV311="$scratch/fresh" VENV312="${XDG_CACHE_HOME:-$HOME/.cache}/questa-nemo-ci/py3.12-torch2.13.0" \
  OUT="$scratch/megatron_versions.json" timeout 30m bash bench/megatron_versions.sh 0.14.0rc3 0.19.2 \
  || { echo "CI: a megatron-core version at the ends of the pinned range failed"; rc=1; }
exit $rc
