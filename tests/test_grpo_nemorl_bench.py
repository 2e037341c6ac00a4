"""bench/bench_grpo_nemorl.py (the NeMo-RL-shaped end-to-end GRPO benchmark) in its CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(out: Path, *options: str) -> dict:
    cmd = [sys.executable, "bench/bench_grpo_nemorl.py", "--device", "cpu", "--tiny", "--prompts", "2"]
    cmd += ["--samples", "4", "--micro-batch-tokens", "256", "--out", str(out), *options]
    # a fresh world of one: not the rendezvous variables an in-process test of this session left behind
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_smoke_run(tmp_path):
    """Sync and one-step-off async, same prompts and forced lengths: the same tokens every step, counted as
    NeMo-RL counts them (prompt + completion of every rollout sample over the step's wall time)."""
    result = run_bench(tmp_path / "nemorl.json", "--recompute", "none")
    settings = result["settings"]
    assert "random" in settings["weights"] and settings["gpus"] == 1
    assert settings["trained_samples_per_step"] == settings["rollout_samples_per_step"] == 8
    assert settings["drawn_lengths"]["max"] == settings["max_total_tokens"] - settings["prompt_max"]
    assert result["nemo_rl_v05"]["on_policy"]["tokens_per_s_per_gpu"] == 1581
    sync, ahead = result["modes"]
    assert "error" not in sync and "error" not in ahead, result["modes"]
    assert [s["total_num_tokens"] for s in sync["steps"]] == [s["total_num_tokens"] for s in ahead["steps"]]
    assert [s["generated_tokens"] for s in sync["steps"]] == [s["generated_tokens"] for s in ahead["steps"]]
    for s in sync["steps"] + ahead["steps"]:
        assert s["samples"] == 8 and s["prompt_tokens"] >= 8 * settings["prompt_min"]
        assert s["total_num_tokens"] == s["prompt_tokens"] + s["generated_tokens"]
        assert abs(s["tokens_per_s_per_gpu"] - s["total_num_tokens"] / s["seconds"]) < 1e-6
        assert s["reference_logprobs_s"] > 0 and s["train_s"] > 0 and s["generation_s"] > 0
    assert [s["staleness_max"] for s in sync["steps"]] == [0.0, 0.0, 0.0]
    assert max(s["staleness_max"] for s in ahead["steps"]) <= 1.0
    assert len(ahead["generate_calls"]) == 4  # the producer stays one step ahead through the last timed step
    assert sync["timed_steps"] == [2, 3] and "reward_s" in sync["mean"]
    assert result["async_speedup_vs_sync"] > 0


def test_cpu_smoke_run_without_the_proximal_pass(tmp_path):
    """--proximal train_forward (no proximal pass: the reference pass runs at the start of training and its
    seconds are counted as log-probs), partial recompute, the producer stream (a no-op on CPU), async only."""
    result = run_bench(tmp_path / "nemorl.json", "--proximal", "train_forward", "--recompute", "full",
                       "--recompute-num-layers", "1", "--producer-stream", "--skip-sync", "--steps", "2")
    settings = result["settings"]
    assert settings["proximal"] == "train_forward" and settings["recompute_num_layers"] == 1
    (ahead,) = result["modes"]
    assert ahead["max_staleness"] == 1 and "error" not in ahead, ahead
    for s in ahead["steps"]:
        assert s["logprobs_s"] == s["reference_logprobs_s"] > 0 and s["train_s"] > 0
    assert "async_speedup_vs_sync" not in result


def test_profile_replays_the_last_steps_micro_batches(tmp_path):
    """--profile: the sync mode's last train_step, its first micro-batches again under torch.profiler (CPU: host
    ops only), with each micro-batch's packed layout and the attention path it takes."""
    result = run_bench(tmp_path / "nemorl.json", "--recompute", "none", "--staleness", "0", "--steps", "1",
                       "--profile", str(tmp_path / "profile"), "--profile-micro-batches", "2")  # fmt: skip
    profile = result["modes"][0]["profile"]
    assert profile["micro_batches"] == min(2, profile["of"]) and profile["row_tokens"] <= 256
    for layout in profile["layouts"]:
        assert 1 <= layout["longest"] <= layout["tokens"] <= 256 and layout["attention"] in ("batched", "per_segment")  # CPU: never varlen
    for phase in ("logprobs", "train_step"):
        assert profile[phase]["wall_ms"] > 0 and profile[phase]["host_self_ms_top"]
    assert sorted(f.name for f in (tmp_path / "profile").iterdir()) == ["grpo_logprobs.json", "grpo_train_step.json"]
