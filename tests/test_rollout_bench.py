"""bench/bench_rollout.py in its CPU smoke mode: the self-check and a tiny throughput run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rollout.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "rollout.json"
    argv = ["--device", "cpu", "--tiny", "--prompts", "2", "--samples", "2", "--prompt-len", "16"]
    argv += ["--new-tokens", "8", "--long-new-tokens", "12", "--long-prompts", "1", "--hf-prompts", "1"]
    argv += ["--hf-new-tokens", "4", "--out", str(out)]
    assert load_bench().main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    assert result["megatron"]["tokens"] == 2 * 2 * 8
    assert result["megatron_long"]["tokens"] == 1 * 2 * 12
    assert result["transformers"]["tokens"] == 1 * 2 * 4
    assert result["speedup_vs_transformers"] > 0 and result["weight_update_seconds"] >= 0


def test_cpu_check(tmp_path):
    out = tmp_path / "check.json"
    assert load_bench().main(["--device", "cpu", "--tiny", "--check", "--out", str(out)]) == 0
    check = json.loads(out.read_text())["check"]
    assert check["greedy_graph_equals_eager"] and check["sampled_graph_equals_eager"]
    assert check["sampled_alone_equals_batched"] == "16/16"  # fp32 on CPU: per-sequence noise, same logits
    assert check["greedy_logprob_vs_full_forward_max_abs"] < 1e-4
    assert check["greedy_prefix_matching_hf"] == [check["greedy_tokens_per_prompt"]] * 4
