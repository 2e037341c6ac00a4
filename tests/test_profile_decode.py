"""bench/profile_decode.py at toy sizes on CPU: every section runs and the JSON holds what the GPU run reports.
With Triton installed the decode step and the attention sweep run the Triton kernels under the interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from test_paged_decode import interpreter_loops  # noqa: F401  (fixture)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "profile_decode.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def load_bench():
    spec = importlib.util.spec_from_file_location("profile_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run(tmp_path, request):
    if HAS_TRITON:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        request.getfixturevalue("interpreter_loops")
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--tiny", "--batch", "8", "--samples", "4", "--prompt-len", "40"]
    argv += ["--context", "72", "--realistic-max", "100", "--length-mean", "30", "--block-size", "16"]
    argv += ["--replays", "2", "--sweep-block-sizes", "16,32", "--quick-sweep", "--attn-reps", "1"]
    argv += ["--sampler-batches", "4", "--sampler-reps", "1", "--out", str(out)]
    argv += ["--cpu-kernel"] if HAS_TRITON else []
    assert load_bench().main(argv) == 0
    result = json.loads(out.read_text())
    for case in ("fixed", "realistic"):
        per = result["cases"][case]
        assert set(per["variants"]) == {"main", "new", "cascade", "ts", "loop", "fn"}
        assert per["variants"]["cascade"]["launch"].get("cascade") is (True if HAS_TRITON else None)
        assert per["variants"]["loop"]["launch"]["merge_tile"] is False
        assert per["variants"]["main"]["launch"]["merge_tile"] is False
        assert per["variants"]["new"]["launch"]["merge_tile"] is True  # the default
        for r in per["variants"].values():
            assert r["graph_step"]["ms"] > 0 and r["eager_profile"]["kernel_sum_ms"] > 0
        if HAS_TRITON:
            rows = per["attention_sweep"]
            assert rows and all("us" in r for r in rows), rows
            assert {r["block_size"] for r in rows} == {16, 32}
            assert any(r["cascade"] for r in rows)
            tiles = [r for r in rows if r["merge_tile"]]  # auto splits, the engine's split length, cascade
            assert len(tiles) == 2 * 3 and any(r["cascade"] for r in tiles)
            assert all(r["max_abs_vs_loop_merge"] < 1e-5 for r in tiles), tiles
    assert per["max_context"] == 140  # 40 + the longest draw (100)
    assert len(result["sampler"]) == 4 + HAS_TRITON  # torch's sampler at four settings, the fused kernel
    assert [r.get("fused", False) for r in result["sampler"]][4:] == [True] * HAS_TRITON
