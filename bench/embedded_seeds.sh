#!/usr/bin/env bash
# The embedded default (`questa-nemo train`, conf/default.yaml) over several seeds, side by side, and one JSON
# summary of them (issue 16: the README states the spread over seeds).
# It reads the two arms `hint` / `no_hint` of issue 16's default. Since issue 20 the default has three arms
# (plain / questa / adaptive): use bench/embedded_arms.sh, or reproduce issue 16's runs here with
# EXTRA='train.arms={hint:${world.output_dir}/rl/p50,no_hint:${world.output_dir}/rl/p0}' (no spaces).
#
#   bash bench/embedded_seeds.sh 1 2 3 4 5
#
# Seed S sets train.seed=S (warm-up batch order, GRPO sampling) and model.seed=S (initial weights); the world
# (world.seed) stays the same, so every seed trains and is evaluated on the same problems. Each seed runs in
# its own process with THREADS intra-op threads (default 2: the README's 2-core setting; a 16-core machine
# runs 8 seeds at once) into $OUT/seed<S>/run, its log in $OUT/seed<S>/log.txt. Afterwards (or with
# SUMMARY_ONLY=1, for runs already there) it writes $OUT/summary.json: per seed the warm-up's stop (step
# trained to, step kept, hinted / no-hint hard pass@1 at the kept check), the evaluation at RL start and of
# both arms (no-hint pass@1 and pass@8 with standard errors on the 500 held-out hard problems), stage wall
# times; then the mean and spread over seeds.
#
# Environment: OUT (default runs/embedded_seeds), THREADS (default 2), PYTHON (default python), EXTRA (more
# Hydra overrides for every seed, e.g. EXTRA="train.steps=600"), SUMMARY_ONLY=1, SUMMARY (default
# $OUT/summary.json). Pinning the CPU's float path (see bench/determinism_probe.py): set ATEN_CPU_CAPABILITY /
# MKL_CBWR in front of the command.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/embedded_seeds.sh SEED [SEED ...]" >&2; exit 2; }
OUT=${OUT:-runs/embedded_seeds}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-python}
SUMMARY=${SUMMARY:-$OUT/summary.json}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${SUMMARY_ONLY:-}" ]; then
  pids=()
  for S in "$@"; do
    mkdir -p "$OUT/seed$S"
    (
      start=$(date +%s)
      # shellcheck disable=SC2086
      OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PYTHON" -m questa_nemo.cli train \
        "train.run_dir=$OUT/seed$S/run" "train.seed=$S" "model.seed=$S" train.progress_bar=false ${EXTRA:-} \
        > "$OUT/seed$S/log.txt" 2>&1
      rc=$?
      echo $rc > "$OUT/seed$S/rc"
      echo $(( $(date +%s) - start )) > "$OUT/seed$S/wall_s"
      echo "seed $S: exit $rc after $(cat "$OUT/seed$S/wall_s") s ($OUT/seed$S/log.txt)"
    ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
fi

"$PYTHON" - "$OUT" "$SUMMARY" "$THREADS" "$@" <<'EOF'
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

out, summary_path, threads, seeds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]


def passk(block, k):
    e = block["world_hard"][str(k)]
    return {"mean": e["mean"], "stderr": e["stderr"]}


def wall(seed_dir):
    if (seed_dir / "wall_s").exists():
        return float((seed_dir / "wall_s").read_text())
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", (seed_dir / "log.txt").read_text())
    return None if not m else int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def stage_minutes(run):
    """Wall time of each stage from the files that mark its end (mtimes)."""
    marks = [("start", run / "config.yaml"), ("warm-up", run / "warmup" / "warmup.json"),
             ("calibration", run / "warmup" / "calibration.json"), ("hint", run / "hint" / "DONE"),
             ("no_hint", run / "no_hint" / "DONE"), ("final eval", run / "summary.json")]
    times = [(name, path.stat().st_mtime) for name, path in marks if path.exists()]
    return {name: round((t - prev) / 60, 2) for (name, t), (_, prev) in zip(times[1:], times)}


def cpu():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


rows = []
for seed in seeds:
    d = out / f"seed{seed}"
    run = d / "run"
    row = {"seed": int(seed), "finished": (run / "summary.json").exists(), "wall_s": wall(d) if (d / "log.txt").exists() else None}
    if (run / "warmup" / "warmup.json").exists():
        w = json.loads((run / "warmup" / "warmup.json").read_text())
        checks = {int(k): v for k, v in w["pass1_checks"].items()}
        kept = w.get("kept_step", w["steps"])
        row["warmup"] = {"steps_trained": w["steps"], "kept_step": kept, "checks": len(checks),
                         "kept_check": checks.get(kept), "last_check": checks[max(checks)] if checks else None}
    if (run / "warmup" / "calibration.json").exists():
        row["calibration_no_hint_pass1_by_length"] = json.loads((run / "warmup" / "calibration.json").read_text())
    if row["finished"]:
        s = json.loads((run / "summary.json").read_text())
        for arm in ("initial", "hint", "no_hint"):
            row[arm] = {"pass@1": passk(s[arm], 1), "pass@8": passk(s[arm], 8)}
        for k in (1, 8):
            h, n = row["hint"][f"pass@{k}"], row["no_hint"][f"pass@{k}"]
            row[f"hint_minus_no_hint_pass@{k}"] = {
                "mean": h["mean"] - n["mean"],
                "stderr": math.hypot(h["stderr"], n["stderr"]),  # as if independent (same problems: conservative)
            }
    row["stage_minutes"] = stage_minutes(run) if run.exists() else {}
    rows.append(row)

done = [r for r in rows if r["finished"]]


def spread(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": m, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


over = {}
if done:
    for arm in ("initial", "hint", "no_hint"):
        for k in (1, 8):
            over[f"{arm}_pass@{k}"] = spread([r[arm][f"pass@{k}"]["mean"] for r in done])
    for k in (1, 8):
        over[f"hint_minus_no_hint_pass@{k}"] = spread([r[f"hint_minus_no_hint_pass@{k}"]["mean"] for r in done])
    over["hint_wins_pass@1"] = sum(r["hint_minus_no_hint_pass@1"]["mean"] > 0 for r in done)
summary = {"machine": {"cpu": cpu(), "cores": os.cpu_count(), "threads_per_run": int(threads),
                       "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}},
           "seeds": rows, "over_seeds": over}
summary_path.write_text(json.dumps(summary, indent=1) + "\n")
print(f"{summary_path}: {len(done)}/{len(rows)} seeds finished\n")


def pct(e):
    return f"{100 * e['mean']:.2f} +- {100 * e['stderr']:.2f}"


print("| seed | warm-up stop: step kept (hinted / no-hint hard pass@1) | at RL start: pass@1, pass@8 (%) | "
      "`hint` arm: pass@1, pass@8 | `no_hint` arm: pass@1, pass@8 | hint - no_hint pass@1 | wall (min) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    w = r.get("warmup", {})
    kc = w.get("kept_check") or {}
    stop = f"{w.get('kept_step')} ({kc.get('hinted', float('nan')):.3f} / {kc.get('no_hint', float('nan')):.3f})" if w else "-"
    if not r["finished"]:
        print(f"| {r['seed']} | {stop} | unfinished | | | | |")
        continue
    cells = [f"{pct(r[a]['pass@1'])}, {pct(r[a]['pass@8'])}" for a in ("initial", "hint", "no_hint")]
    d = r["hint_minus_no_hint_pass@1"]
    minutes = f"{r['wall_s'] / 60:.0f}" if r["wall_s"] else "-"
    print(f"| {r['seed']} | {stop} | {' | '.join(cells)} | {pct(d)} | {minutes} |")
EOF
