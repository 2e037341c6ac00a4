"""Does the embedded default compute the same floats on this CPU as on another? (issue 16)

Runs a shortened embedded default (`questa-nemo train`, conf/default.yaml): N supervised warm-up steps (no stop by
calibration), then K GRPO steps of each arm, no validation, no final evaluation, in a temporary run folder; then
prints hashes of what it computed:

  warmup_nll      the warm-up's loss curve (every value, full precision), plus prefix hashes at steps 1, 2, 5,
                  10, 20, 50, ... so two machines that differ show where they part
  warmup_weights  the warm-up checkpoint's tensors
  <arm>_metrics   each arm's per-step metrics (timings and memory dropped)
  <arm>_weights   each arm's final checkpoint (equal to warmup_weights while the warm-up is too short for any
                  hard problem to be solved: all-wrong groups have zero advantage, so GRPO moves nothing; the
                  metrics still hash the sampled tokens, log-probs and entropies)

Run it with the same arguments and environment on two machines and compare the JSON (or pass --compare
OTHER.json). Everything that can change float rounding between x86 CPUs is recorded: torch's CPU dispatch level
(set ATEN_CPU_CAPABILITY=default|avx2|avx512 to pin it), MKL (MKL_CBWR=COMPATIBLE|AVX2|... pins its code path;
without it MKL picks by CPU), the intra-op thread count (--threads; sets OMP_NUM_THREADS and MKL_NUM_THREADS).

    python bench/determinism_probe.py --json probe.json
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE python bench/determinism_probe.py --json probe_pinned.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shapes import cpu_model  # noqa: E402  (bench/ is the script folder)

REPO = Path(__file__).resolve().parent.parent
ENV_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND")
PREFIXES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
VOLATILE = ("time/", "perf/", "timing", "throughput", "per_s", "mem", "rss", "wall", "sec")  # not computed floats


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def machine_info() -> dict:
    """What this process's torch sees (a child with the same environment sees the same)."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkl_version": next((line.strip() for line in torch.__config__.show().splitlines() if "Math Kernel" in line),
                            None),
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
    }


def weights_hash(checkpoint: Path) -> str:
    from questa_nemo.ckpt.native import read_native

    model = read_native(checkpoint)
    h = hashlib.sha256()
    for name in sorted(model.tensors):
        tensor = model.tensors[name].contiguous()
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()[:16]


def stable_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not any(word in k.lower() for word in VOLATILE)})
    return rows


def probe(args) -> dict:
    from questa_nemo.ckpt.runs import latest_checkpoint

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="determinism_probe_"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable, "-m", "questa_nemo.cli", "train", f"train.run_dir={run_dir}",
        f"train.seed={args.seed}", f"model.seed={args.seed}",
        f"train.warmup.steps={args.warmup_steps}", "train.warmup.stop_at_pass1=null",
        f"train.steps={args.grpo_steps}", f"train.save_every={args.grpo_steps}", "train.eval_every=0",
        "train.validation_samples=1",  # the calibration table after the warm-up (not hashed)
        "train.final_eval=false", "train.progress_bar=false", "train.log_tensorboard=false", *args.overrides,
    ]
    start = time.time()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"determinism_probe: the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    warmup = json.loads((run_dir / "warmup" / "warmup.json").read_text())
    nll = warmup["nll"]
    out = {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "compare", "keep")},
        "machine": machine_info() | {"env": {k: env.get(k) for k in ENV_KEYS}},
        "wall_s": round(time.time() - start, 1),
        "cpu_s": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime, 1),  # less swayed by other load
        "warmup_nll": digest(nll),
        "warmup_nll_prefix": {str(n): digest(nll[:n]) for n in PREFIXES if n <= len(nll)},
        "warmup_nll_last": nll[-1],
        "warmup_weights": weights_hash(run_dir / "warmup" / "checkpoint"),
    }
    for arm in ("hint", "no_hint"):
        rows = stable_metrics(run_dir / arm / "metrics.jsonl")
        out[f"{arm}_metrics"] = digest(rows)
        out[f"{arm}_metrics_prefix"] = [digest(rows[: i + 1]) for i in range(len(rows))]
        out[f"{arm}_weights"] = weights_hash(latest_checkpoint(run_dir / arm))
    if not args.keep and not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def compare(mine: dict, other: dict) -> list[str]:
    """Human-readable differences between two probes' hashes ([] = identical)."""
    lines = []
    for key in ("warmup_nll", "warmup_weights", "hint_metrics", "hint_weights", "no_hint_metrics", "no_hint_weights"):
        if mine.get(key) != other.get(key):
            lines.append(f"{key}: {mine.get(key)} != {other.get(key)}")
    prefixes = [n for n in mine.get("warmup_nll_prefix", {}) if n in other.get("warmup_nll_prefix", {})]
    same = [n for n in prefixes if mine["warmup_nll_prefix"][n] == other["warmup_nll_prefix"][n]]
    if len(same) < len(prefixes):
        lines.append(f"warm-up losses agree up to step {same[-1] if same else 0}, "
                     f"differ by step {next(n for n in prefixes if n not in same)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (OMP_NUM_THREADS, MKL_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--compare", help="a probe JSON from another machine or setting to compare against")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for the run")
    args = parser.parse_args()
    result = probe(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.compare:
        diffs = compare(result, json.loads(Path(args.compare).read_text()))
        print("IDENTICAL to " + args.compare if not diffs else "DIFFERENT from " + args.compare + ":\n  "
              + "\n  ".join(diffs))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
