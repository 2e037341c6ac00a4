"""bench/bench_policy.py's CPU smoke mode runs end to end and writes the result it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_policy.py"


@pytest.mark.slow
def test_bench_policy_cpu_smoke(tmp_path):
    out = tmp_path / "policy.json"
    args = ["--device", "cpu", "--tiny", "--sequences", "6", "--min-len", "8", "--max-len", "64"]
    args += ["--micro-batch-tokens", "128", "--steps", "1", "--out", str(out)]
    # a fresh world of one: not the rendezvous an in-process test of this session left in os.environ
    dist_keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_keys}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["device"] and result["shape"] == "tiny"
    assert result["packed"]["micro_batches"] < result["unpacked"]["micro_batches"] == 6
    assert result["packed"]["real_tokens"] == result["unpacked"]["real_tokens"]
    assert result["checkpoint"]["resume_exact"] and result["checkpoint"]["optimizer_restored"]
